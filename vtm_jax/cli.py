"""The ``vtm-jax`` command: convert, predict, eval, bench, train, visualize, demo, sweep.

Bad input ends with one line ``vtm-jax: error: ...`` and exit status 2, never a traceback:
:func:`main` turns every expected failure (``vtm_jax.errors.expected_failure``) into that
line, and each command checks its output locations (``vtm_jax.outputs``) before any work.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from vtm_jax import paths
from vtm_jax.checkpoints.convert.sources import SOURCES
from vtm_jax.errors import UserError, expected_failure
from vtm_jax.merging import RULES
from vtm_jax.outputs import atomic_file, check_output_dir, check_output_file, write_json


def _convert(args: argparse.Namespace) -> None:
    from vtm_jax.checkpoints.convert.sources import load_source
    from vtm_jax.checkpoints.store import check_new_checkpoint, save_checkpoint

    check_new_checkpoint(args.output, what="--output")  # before the weights are read
    params, record = load_source(
        args.source,
        args.input,
        num_frames=args.num_frames,
        image_size=args.image_size,
        num_heads=args.num_heads,
    )
    splits = record.class_splits
    if args.class_splits:
        try:
            splits = [int(v) for v in args.class_splits.split(",")]
        except ValueError:
            raise UserError(
                f"--class-splits must be integers like 97,300, not {args.class_splits!r}"
            ) from None
        if sum(splits) != record.num_classes:
            raise UserError(
                f"--class-splits add up to {sum(splits)}, the classifier has "
                f"{record.num_classes} classes"
            )
    converted_from = {"source": args.source, "path": paths.absolute(args.input)}
    if args.source == "hf" and not paths.exists(args.input):  # a Hub id, read from the cache
        from vtm_jax.checkpoints.convert.hub import cached_snapshot

        converted_from = {
            "source": "hf",
            "repo_id": args.input,
            "path": cached_snapshot(args.input),
        }
    record = dataclasses.replace(record, class_splits=splits, converted_from=converted_from)
    save_checkpoint(args.output, params, record)
    print(f"wrote {args.output} ({record.architecture})")


def _merging_from_args(args: argparse.Namespace, stored: dict | None):
    from vtm_jax.merging import MergingSettings

    # The stored settings in today's form (a format-1 record keeps threshold beside the mode),
    # so that the flags below replace its options rather than repeat them.
    values = MergingSettings.from_dict(stored).to_dict() if stored else {}
    if args.mode is not None:
        values["mode"] = args.mode
    if args.r is not None:
        values["r"] = args.r
        if values.get("mode", "none") == "none" and args.mode is None:
            values["mode"] = "merge"  # --r alone asks for the paper's default mode
    for name in ("schedule", "seed", "head_aggregation", "motionformer_concat_keys"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.prop_attn is not None:
        values["prop_attn"] = args.prop_attn
    options = _rule_options(args.rule_option or [])
    if args.threshold is not None:
        options["threshold"] = args.threshold
    values["rule_options"] = {**values.get("rule_options", {}), **options}
    settings = MergingSettings.from_dict(values)
    if args.threshold is not None and settings.mode != "hybrid":
        raise UserError(f"--threshold is read only by mode hybrid, not {settings.mode!r}")
    return settings


def _rule_options(flags: Sequence[str]) -> dict[str, Any]:
    """``--rule-option name=value`` flags; a value is read as JSON (0.4, 3, true) or a string."""
    options = {}
    for item in flags:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UserError(f"--rule-option takes NAME=VALUE, not {item!r}")
        try:
            options[name] = json.loads(text)
        except json.JSONDecodeError:
            options[name] = text
    return options


def _logits_path(path: str) -> str:
    """Where ``--save-logits`` writes: numpy's ``.npy`` is added to a name without it."""
    check_output_file(path, what="--save-logits")  # a directory named X is not X.npy's place
    return path if path.endswith(".npy") else path + ".npy"


def _predict(args: argparse.Namespace) -> None:
    import numpy as np

    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.jobs.predict import predict, top_k

    merging = _merging_from_args(args, load_record(args.checkpoint).token_merging)
    logits, record = predict(
        args.checkpoint, args.video, merging, args.attention, verify=args.verify
    )
    print(f"mode={merging.mode} r={merging.r} schedule={merging.schedule}")
    for name, start, stop in record.heads():
        labels = record.labels
        if name:
            print(f"{name}:")
        for rank, (index, label, prob) in enumerate(
            top_k(logits[start:stop], labels[start:stop] if labels else None), 1
        ):
            print(f"{rank}. {label} (class {index}): {prob:.4f}")
    if args.save_logits:
        path = _logits_path(args.save_logits)
        with atomic_file(path, "wb") as f:
            np.save(f, logits)
        print(f"logits written to {path}")


def _init_distributed(args: argparse.Namespace) -> None:
    """Join the processes of a multi-host run before JAX touches a device."""
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise UserError("--coordinator needs --num-processes and --process-id")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--coordinator must be HOST:PORT, not {args.coordinator!r}")
        if args.num_processes < 1:
            raise UserError(f"--num-processes must be at least 1, not {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            raise UserError(
                f"--process-id must be in [0, {args.num_processes}) for --num-processes "
                f"{args.num_processes}, not {args.process_id}"
            )
        start = lambda: jax.distributed.initialize(  # noqa: E731
            args.coordinator, args.num_processes, args.process_id
        )
    elif args.num_processes is not None or args.process_id is not None:
        raise UserError("--num-processes and --process-id need --coordinator")
    elif args.distributed:
        start = jax.distributed.initialize  # TPU pods and SLURM describe the cluster themselves
    else:
        return
    try:
        start()
    except (RuntimeError, ValueError) as e:  # unreachable coordinator, undetected cluster
        where = args.coordinator or "the auto-detected cluster"
        raise UserError(f"cannot join the distributed run at {where}: {e}") from None


def _bench(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    _init_distributed(args)
    import jax

    from vtm_jax.config.loading import load_config, record_from_config
    from vtm_jax.jobs.bench import (
        bench_settings,
        format_table,
        matmul_peak_gflops,
        plot_speed,
        run_info,
        sweep,
    )
    from vtm_jax.merging import MergingSettings

    config = load_config(config_args, command="bench")
    stem = _bench_stem(args)
    if stem:  # every file the results go to, before anything is timed
        for suffix in (".json", ".md", ".png"):
            check_output_file(stem + suffix, what="--workdir" if args.workdir else "--output")
    record = record_from_config(config)
    bench = config.get("bench", {})
    settings = sweep(
        MergingSettings.from_dict(config.get("token_merging")),
        modes=bench.get("modes"),
        r_values=bench.get("r_values"),
        schedules=bench.get("schedules"),
    )
    batch = bench.get("batch_size", 1)
    info = run_info(batch)
    lead = jax.process_index() == 0
    say = print if lead else (lambda *_: None)
    fields = ", ".join(f"{k}={v}" for k, v in record.model.items() if v is not None)
    say(
        f"{config.get('experiment_name', 'model')}: {record.architecture} ({fields}), input "
        f"{record.num_frames}x{record.image_size}x{record.image_size}, random weights; "
        f"{info['devices']} {info['device_kind']} device(s) in {info['processes']} process(es), "
        f"batch {batch} per device"
    )
    results = bench_settings(
        record,
        settings,
        batch_size=batch,
        warmup=bench.get("warmup", 1),
        iterations=bench.get("iterations", 3),
        attention=bench.get("attention", "auto"),
        progress=say,
        clips_per_step=bench.get("clips_per_step"),
    )
    # Measured again after the timing, the best kept: one reading taken in a loaded moment
    # would make every rate look closer to the peak than it is.
    info["matmul_peak_gflop_per_s"] = max(info["matmul_peak_gflop_per_s"], matmul_peak_gflops())
    for r in results:
        say(f"\nmode={r['mode']} r={r['r']} schedule={r['schedule']}")
        say(f"  r per layer:      {r['r_per_layer']}")
        say(f"  tokens per layer: {r['tokens_per_layer']}")
        say(f"  GMACs per layer:  {[float(f'{g:.4g}') for g in r['gmacs_per_layer']]}")
    table = format_table(results)
    say("\n" + table)
    if stem and lead:
        write_json(
            stem + ".json",
            {"config": config.to_dict(), "run": info, "results": results},
            indent=2,
            default=str,
        )
        with atomic_file(stem + ".md") as f:
            f.write(table + "\n")
        plot_speed(results, stem + ".png", f"{record.architecture} on {info['device_kind']}")
        print(f"\nresults written to {stem}.json, {stem}.md and {stem}.png")


def _bench_stem(args: argparse.Namespace) -> str | None:
    """Where bench's results go, without the suffix: ``WORKDIR/bench`` or ``--output``'s."""
    if args.workdir:
        if args.output:
            raise UserError("give --workdir or --output, not both")
        _make_workdir(args.workdir)
        return paths.join(args.workdir, "bench")
    if not args.output:
        return None
    check_output_file(args.output, what="--output")
    return args.output[: -len(".json")] if args.output.endswith(".json") else args.output


def _make_workdir(workdir: str) -> None:
    """Check ``--workdir`` and create it, so the files in it can be checked before work."""
    check_output_dir(workdir, what="--workdir")
    paths.makedirs(workdir)


EVAL_RESULTS = "eval.json"


def _eval(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    _init_distributed(args)
    import jax

    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.evaluation.evaluate import format_results
    from vtm_jax.jobs.evaluation.from_config import eval_config

    config = load_config(config_args, command="eval")
    if args.workdir:
        if config.get("results_path"):
            raise UserError("give --workdir or --config.results_path, not both")
        _make_workdir(args.workdir)
        with config.unlocked():
            config.results_path = paths.join(args.workdir, EVAL_RESULTS)
    path = config.get("results_path")
    table = None
    if path:  # the table beside the JSON, as bench and demo write theirs
        table = (path[: -len(".json")] if path.endswith(".json") else path) + ".md"
        check_output_file(table, what="results_path's table")
    results = eval_config(config, verify=args.verify)
    lead = jax.process_index() == 0
    if table and lead:
        with atomic_file(table) as f:
            f.write(format_results(results) + "\n")
        print(f"table written to {table}")
    if args.workdir:
        _log_eval_scalars(config, results, args.workdir, lead=lead)


def _log_eval_scalars(config, results: dict, workdir: str, *, lead: bool) -> None:
    """The metrics as TensorBoard scalars in the workdir (clu.metric_writers, as Scenic's
    evaluators), at the step the checkpoint was trained to (0 when it does not say)."""
    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.config.scenic_checkpoint import checkpoint_record
    from vtm_jax.jobs.tensorboard import metric_writer

    record = load_record(config.checkpoint, scenic_record=checkpoint_record(config))
    step = int((record.trained or {}).get("steps", 0))
    scalars = {f"eval/{name}": value for name, value in results["metrics"].items()}
    scalars["eval/clips_per_s"] = results["clips_per_s"]
    writer = metric_writer(workdir, lead=lead)
    writer.write_scalars(step, scalars)
    writer.close()


def _train(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.training.train import train

    config = load_config(config_args, command="train")
    for field in ("dataset_name", "batch_size"):
        if not config.get(field):
            raise UserError(f"train needs config.{field}")
    if not config.get("dataset_configs", {}).get("data_dir"):
        raise UserError("train needs config.dataset_configs.data_dir")
    train(config, args.workdir)


def _demo(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.demo import demo_config, run_demo, shipped_checkpoint

    checkpoint = args.checkpoint or shipped_checkpoint()
    config = load_config(config_args, command="demo") if config_args else demo_config(checkpoint)
    for block in ("dataset_configs", "token_merging", "demo"):
        if not config.get(block):
            raise UserError(f"demo needs config.{block}")
    out = _workdir_or_out(args, "out/demo")
    run_demo(config, checkpoint=checkpoint, out_dir=out)


def _workdir_or_out(args: argparse.Namespace, default: str) -> str:
    """The output directory of demo and visualize: ``--workdir``, or ``--out`` as before;
    checked, and named in messages by the flag that gave it."""
    if args.workdir and args.out:
        raise UserError("give --workdir or --out (the same setting), not both")
    flag, path = ("--out", args.out) if args.out else ("--workdir", args.workdir or default)
    return check_output_dir(path, what=flag)


def _visualize(args: argparse.Namespace) -> None:
    from vtm_jax.jobs.visualize import visualize

    if args.scale is not None and args.scale < 1:  # before the output directory or the model
        raise UserError(f"--scale must be a positive integer, not {args.scale}")
    out = _workdir_or_out(args, "out/visualize")
    merging = None
    if any(getattr(args, name) is not None for name in ("mode", "r", "threshold")):
        from vtm_jax.checkpoints.store import load_record

        merging = _merging_from_args(args, load_record(args.checkpoint).token_merging)
    written = visualize(
        args.checkpoint,
        args.video,
        layers=args.layers,  # None: a third, two thirds and all of the way through
        out_dir=out,
        merging=merging,
        attention=args.attention,
        verify=args.verify,
        scale=args.scale,  # None: enough for 128 px frames
    )
    for path in written:
        print(f"wrote {path}")


def _sweep(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.jobs import sweep

    if args.list:
        print(sweep.describe_families())
        return
    if any(a.startswith("--config=") for a in config_args):
        raise UserError(
            "sweep takes --config.field=value overrides for every run, not --config=FILE "
            "(a pair's own config file goes in the runs file)"
        )
    sweep.get_families(args.families)  # an unknown name fails before anything is read
    for name in ("runs", "workdir"):
        if not getattr(args, name):
            raise UserError(f"sweep needs --{name} (or --list)")
    check_output_dir(args.workdir, what="--workdir")
    sweep.run_sweep(
        args.runs,
        args.workdir,
        args.families,
        overrides=config_args,
        curve_steps=args.curve_steps,
    )


CONFIG_COMMANDS = ("bench", "eval", "train", "demo", "sweep")
# Modes are checked by MergingSettings, so registered rules and 'module:attr' paths work too.
MODE_HELP = f"merging mode: {', '.join(RULES)}, or a 'package.module:attribute' rule"


def build_parser() -> argparse.ArgumentParser:
    from vtm_jax import __version__

    parser = argparse.ArgumentParser(prog="vtm-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vtm-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    pred = _add_predict(sub)
    bench, evaluate = _add_bench(sub), _add_eval(sub)
    _add_train(sub)
    vis = _add_visualize(sub)
    _add_demo(sub)
    _add_sweep(sub)
    for loads_checkpoint in (pred, evaluate, vis):
        loads_checkpoint.add_argument(
            "--no-verify",
            dest="verify",
            action="store_false",
            help="skip the checkpoint's digest and finiteness checks (faster for large ones)",
        )
    for multi_host in (bench, evaluate):
        multi_host.add_argument(
            "--distributed", action="store_true", help="jax.distributed, auto-detected"
        )
        multi_host.add_argument(
            "--coordinator", help="HOST:PORT of process 0 (explicit multi-host)"
        )
        multi_host.add_argument("--num-processes", type=int)
        multi_host.add_argument("--process-id", type=int)
    return parser


def _add_convert(sub: Any) -> argparse.ArgumentParser:
    convert = sub.add_parser("convert", help="PyTorch/HF or Scenic weights -> checkpoint directory")
    convert.add_argument("--source", choices=SOURCES, required=True)
    convert.add_argument(
        "--input",
        required=True,
        help="checkpoint file, HF model directory, or (hf) a Hub repo id in the local HF cache",
    )
    convert.add_argument("--output", required=True, help="new checkpoint directory")
    # Not for hf: config.json says. Default: the file's cfg, else the model's usual.
    convert.add_argument("--num-frames", type=int, help="input frames (default 32 for Scenic)")
    convert.add_argument("--image-size", type=int, help="input size (default 224)")
    convert.add_argument("--num-heads", type=int, help="attention heads of a .pyth/.pth model")
    convert.add_argument(
        "--class-splits",
        help="sizes of the heads in one concatenated classifier, e.g. 97,300 for EPIC-KITCHENS",
    )
    return convert


def _add_merging_options(parser: argparse.ArgumentParser) -> None:
    """The merging flags of the commands that take a checkpoint without a config file."""
    parser.add_argument("--mode", help=MODE_HELP)
    parser.add_argument("--r", type=int, help="tokens removed per layer")
    parser.add_argument("--schedule", type=float, help="inflection: 0 constant, -1 dec., 1 inc.")
    parser.add_argument("--threshold", type=float, help="hybrid mode's similarity threshold")
    parser.add_argument(
        "--rule-option",
        action="append",
        metavar="NAME=VALUE",
        help="an option of the mode's rule (repeatable), e.g. --rule-option threshold=0.4",
    )
    parser.add_argument(
        "--prop-attn",
        action=argparse.BooleanOptionalAction,
        help="proportional attention (default: as stored with the checkpoint)",
    )
    parser.add_argument("--head-aggregation", choices=("mean", "concat"))
    parser.add_argument(
        "--motionformer-concat-keys",
        action="store_const",
        const=True,
        help="Motionformer: really concatenate the heads' keys with --head-aggregation concat",
    )
    parser.add_argument("--seed", type=int, help="seed of the random modes")
    parser.add_argument("--attention", default="auto", help="attention backend")


def _add_predict(sub: Any) -> argparse.ArgumentParser:
    pred = sub.add_parser("predict", help="classify one clip")
    pred.add_argument("--checkpoint", required=True)
    pred.add_argument("--video", required=True, help=".npy (T, H, W, 3) or a video file")
    _add_merging_options(pred)
    pred.add_argument("--save-logits", metavar="OUT.npy")
    return pred


def _add_bench(sub: Any) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench",
        help="throughput at r=0 and the config's merging",
        description="--config=FILE.py and --config.field=value overrides, as in Scenic",
    )
    bench.add_argument(
        "--workdir", help="directory for the results: bench.json, bench.md (table), bench.png"
    )
    bench.add_argument("--output", help="results: OUT.json, plus OUT.md (table) and OUT.png (plot)")
    return bench


def _add_eval(sub: Any) -> argparse.ArgumentParser:
    evaluate = sub.add_parser(
        "eval",
        help="accuracy of a checkpoint on a dataset, on every device",
        description="--config=FILE.py and --config.field=value overrides, as in Scenic",
    )
    evaluate.add_argument(
        "--workdir",
        help=f"directory for {EVAL_RESULTS}, eval.md (table) and TensorBoard events (rerun to "
        "resume); or --config.results_path=FILE.json for the results file alone, with FILE.md",
    )
    return evaluate


def _add_train(sub: Any) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train",
        help="train or fine-tune with optax (optionally with merging); resumes when rerun",
        description="--config=FILE.py and --config.field=value overrides, as in Scenic",
    )
    train.add_argument(
        "--workdir",
        required=True,
        help="checkpoints, train_log.jsonl and the exported model/ (rerun to resume)",
    )
    return train


def _add_visualize(sub: Any) -> argparse.ArgumentParser:
    vis = sub.add_parser("visualize", help="draw which tokens merged, as PNG grids and a GIF")
    vis.add_argument("--checkpoint", required=True)
    vis.add_argument("--video", required=True, help=".npy (T, H, W, 3) or a video file")
    vis.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        help="draw after these layers (1-based; default: a third, two thirds and the last)",
    )
    vis.add_argument(
        "--scale",
        type=int,
        default=None,
        help="draw each pixel as an N x N block, nearest neighbour (default: the smallest N "
        "that makes a frame at least 128 px on its short side: 4 for 32x32, 1 for 224x224)",
    )
    vis.add_argument("--workdir", help="directory for the pictures (default out/visualize)")
    vis.add_argument("--out", help="the same as --workdir (its older name)")
    _add_merging_options(vis)
    return vis


def _add_demo(sub: Any) -> argparse.ArgumentParser:
    demo = sub.add_parser(
        "demo",
        help="the paper's table in miniature on the shipped checkpoint (the README's first command)",
        description="optional --config=FILE.py (default: the checkpoint's own training config)",
    )
    demo.add_argument("--checkpoint", help="default: the shipped vtm_jax/assets/demo_vivit")
    demo.add_argument("--workdir", help="directory for results and pictures (default out/demo)")
    demo.add_argument("--out", help="the same as --workdir (its older name)")
    return demo


def _add_sweep(sub: Any) -> argparse.ArgumentParser:
    sw = sub.add_parser(
        "sweep",
        help="the paper's experiment families over your checkpoints, as its tables",
        description="Runs named experiment families of the paper (--list shows them) over the "
        "(model, dataset) pairs of a runs file; --config.field=value overrides apply to every "
        "run (the family's own settings win).",
    )
    sw.add_argument(
        "--runs",
        help="JSON: model -> dataset -> {checkpoint, data_dir, manual_dir[, config, overrides]}",
    )
    sw.add_argument("--workdir", help="results of every run (resumed when rerun) and the tables")
    sw.add_argument(
        "--families",
        nargs="+",
        default=["table"],
        help="family names (comma or space separated), 'table' or 'all' (default: table)",
    )
    sw.add_argument("--list", action="store_true", help="list the families and exit")
    sw.add_argument(
        "--curve-steps",
        type=int,
        default=16,
        help="r values of the r-curve families: this many equal steps up to the largest r",
    )
    return sw


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --config and --config.x=y go to ml_collections, the rest to argparse.
    config_args = [a for a in argv if a == "--config" or a.startswith("--config")]
    if "--config" in config_args:
        parser.error("write --config=FILE (with '=')")
    args = parser.parse_args([a for a in argv if a not in config_args])
    if config_args and args.command not in CONFIG_COMMANDS:
        parser.error(f"{args.command} takes no --config")
    try:
        if args.command == "predict" and args.save_logits:
            check_output_file(_logits_path(args.save_logits), what="--save-logits")
        if args.command == "convert":
            _convert(args)
        elif args.command == "predict":
            _predict(args)
        elif args.command == "eval":
            _eval(args, config_args)
        elif args.command == "train":
            _train(args, config_args)
        elif args.command == "demo":
            _demo(args, config_args)
        elif args.command == "visualize":
            _visualize(args)
        elif args.command == "sweep":
            _sweep(args, config_args)
        else:
            _bench(args, config_args)
    except KeyboardInterrupt:
        print("vtm-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = expected_failure(e)
        if message is None:
            raise  # a bug in vtm-jax: its traceback is the report
        print(f"vtm-jax: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
