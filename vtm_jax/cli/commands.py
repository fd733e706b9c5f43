"""What each ``vtm-jax`` subcommand does with its parsed arguments: call its job function.

The jobs themselves (:mod:`vtm_jax.jobs`) take plain values, as notebooks call them; here are
only the translations from flags to those values and the lines a command prints.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from vtm_jax import paths
from vtm_jax.errors import UserError
from vtm_jax.outputs import atomic_file, check_output_dir, check_output_file


def convert_command(args: argparse.Namespace, config_args: Sequence[str] = ()) -> None:
    from vtm_jax.jobs.convert import convert

    splits = None
    if args.class_splits:
        try:
            splits = [int(v) for v in args.class_splits.split(",")]
        except ValueError:
            raise UserError(
                f"--class-splits must be integers like 97,300, not {args.class_splits!r}"
            ) from None
    record = convert(
        args.source,
        args.input,
        args.output,
        num_frames=args.num_frames,
        image_size=args.image_size,
        num_heads=args.num_heads,
        class_splits=splits,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.output} ({record.architecture})")


def _merging_from_args(args: argparse.Namespace, stored: dict | None):
    """The stored settings changed by the merging flags, under the API's rule: ``--r`` alone on
    settings whose mode is none asks for mode ``merge`` (``merging.settings.changed``)."""
    from vtm_jax.merging import MergingSettings
    from vtm_jax.merging.settings import changed

    base = MergingSettings.from_dict(stored) if stored else MergingSettings()
    mode = args.mode if args.mode is not None else base.mode
    if args.threshold is not None and mode != "hybrid":
        raise UserError(f"--threshold is read only by mode hybrid, not {mode!r}")
    changes: dict[str, Any] = {}
    for name in ("mode", "r", "schedule", "seed", "head_aggregation", "prop_attn"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.motionformer_concat_keys is not None:
        changes["motionformer_concat_keys"] = args.motionformer_concat_keys
    options = _rule_options(args.rule_option or [])
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if options:
        changes["rule_options"] = options
    return changed(base, changes)


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


def logits_path(path: str) -> str:
    """Where ``--save-logits`` writes: numpy's ``.npy`` is added to a name without it."""
    check_output_file(path, what="--save-logits")  # a directory named X is not X.npy's place
    return path if path.endswith(".npy") else path + ".npy"


def predict_command(args: argparse.Namespace, config_args: Sequence[str] = ()) -> None:
    import numpy as np

    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.jobs.predict import check_logits_output, merging_line, predict, top_k

    stored = load_record(args.checkpoint)
    merging = _merging_from_args(args, stored.token_merging)
    path = logits_path(args.save_logits) if args.save_logits else None
    if path:  # before the model runs: never onto the clip, nor a file predict did not write
        check_logits_output(
            path, stored, video=args.video, checkpoint=args.checkpoint, overwrite=args.overwrite
        )
    logits, record = predict(
        args.checkpoint, args.video, merging, args.attention, verify=args.verify, dtype=args.dtype
    )
    print(merging_line(record, merging))  # the r the model applies, after its clamp
    for name, start, stop in record.heads():
        labels = record.labels
        if name:
            print(f"{name}:")
        for rank, (index, label, prob) in enumerate(
            top_k(logits[start:stop], labels[start:stop] if labels else None), 1
        ):
            print(f"{rank}. {label} (class {index}): {prob:.4f}")
    if path:
        with atomic_file(path, "wb") as f:
            np.save(f, logits)
        print(f"logits written to {path}")


def _init_distributed(args: argparse.Namespace) -> None:
    """Join the processes of a multi-host run before JAX touches a device."""
    from vtm_jax.runtime.distributed import join_processes

    join_processes(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)


def bench_command(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    _init_distributed(args)
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.bench import bench, check_bench_outputs

    config = load_config(config_args, command="bench")
    stem = _bench_stem(args)
    overwrite = args.overwrite or bool((config.get("bench") or {}).get("overwrite", False))
    if stem:  # named by the flag that gave it, before anything is timed
        what = "--workdir" if args.workdir else "--output"
        inputs = _config_file(config_args)
        check_bench_outputs(stem, what=what, overwrite=overwrite, inputs=inputs)
    bench(config, stem=stem, overwrite=overwrite)


def _config_file(config_args: Sequence[str]) -> dict[str, str]:
    """The config file a command reads (``--config=FILE``), as an input no output may be."""
    import os

    for arg in config_args:
        if arg.startswith("--config="):
            path = arg[len("--config=") :]
            if os.path.isfile(path):
                return {"--config": path}
    return {}


def _overwrite_in(config: Any, block: str) -> None:
    """``--overwrite`` as the config's ``<block>.overwrite``."""
    with config.unlocked():
        if config.get(block) is None:
            config[block] = {}
        config[block].overwrite = True


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


def eval_command(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    _init_distributed(args)
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.evaluation.from_config import eval_to_files

    config = load_config(config_args, command="eval")
    if args.overwrite:
        _overwrite_in(config, "eval")
    eval_to_files(config, workdir=args.workdir, verify=args.verify)


def train_command(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.training.train import train

    config = load_config(config_args, command="train")
    for field in ("dataset_name", "batch_size"):
        if not config.get(field):
            raise UserError(f"train needs config.{field}")
    if not config.get("dataset_configs", {}).get("data_dir"):
        raise UserError("train needs config.dataset_configs.data_dir")
    train(config, args.workdir, overwrite=args.overwrite)


def demo_command(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.config.loading import load_config
    from vtm_jax.jobs.demo import check_demo_outputs, demo_config, run_demo, shipped_checkpoint

    checkpoint = args.checkpoint or shipped_checkpoint()
    config = load_config(config_args, command="demo") if config_args else demo_config(checkpoint)
    for block in ("dataset_configs", "token_merging", "demo"):
        if not config.get(block):
            raise UserError(f"demo needs config.{block}")
    out = _workdir_or_out(args, "out/demo")
    # Named by the flag that gave the directory, before anything is evaluated.
    check_demo_outputs(config, checkpoint, out, what=_out_flag(args), overwrite=args.overwrite)
    run_demo(config, checkpoint=checkpoint, out_dir=out, overwrite=args.overwrite, dtype=args.dtype)


def _workdir_or_out(args: argparse.Namespace, default: str) -> str:
    """The output directory of demo and visualize: ``--workdir``, or ``--out`` as before;
    checked, and named in messages by the flag that gave it."""
    if args.workdir and args.out:
        raise UserError("give --workdir or --out (the same setting), not both")
    return check_output_dir(args.out or args.workdir or default, what=_out_flag(args))


def _out_flag(args: argparse.Namespace) -> str:
    return "--out" if args.out else "--workdir"


def visualize_command(args: argparse.Namespace, config_args: Sequence[str] = ()) -> None:
    from vtm_jax.jobs.visualize import check_picture_outputs, visualize

    if args.scale is not None and args.scale < 1:  # before the output directory or the model
        raise UserError(f"--scale must be a positive integer, not {args.scale}")
    out = _workdir_or_out(args, "out/visualize")
    check_picture_outputs(
        args.checkpoint,
        args.video,
        args.layers,
        out,
        what=_out_flag(args),
        overwrite=args.overwrite,
    )
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
        overwrite=args.overwrite,
    )
    for path in written:
        print(f"wrote {path}")


def configs_command(args: argparse.Namespace, config_args: Sequence[str] = ()) -> None:
    from vtm_jax.config.shipped import listing, shipped_dir

    print(listing())
    print(f"\n--config=NAME runs one; the files are in {shipped_dir()}")


def sweep_command(args: argparse.Namespace, config_args: Sequence[str]) -> None:
    from vtm_jax.jobs.sweep import run_sweep
    from vtm_jax.jobs.sweep_families import describe_families, get_families

    if args.list:
        print(describe_families())
        return
    if any(a.startswith("--config=") for a in config_args):
        raise UserError(
            "sweep takes --config.field=value overrides for every run, not --config=FILE "
            "(a pair's own config file goes in the runs file)"
        )
    get_families(args.families)  # an unknown name fails before anything is read
    for name in ("runs", "workdir"):
        if not getattr(args, name):
            raise UserError(f"sweep needs --{name} (or --list)")
    check_output_dir(args.workdir, what="--workdir")
    run_sweep(
        args.runs,
        args.workdir,
        args.families,
        overrides=config_args,
        curve_steps=args.curve_steps,
        overwrite=args.overwrite,
    )


# Each command's handler: handler(parsed arguments, --config arguments).
HANDLERS = {
    name: globals()[f"{name}_command"]
    for name in (
        "convert",
        "predict",
        "eval",
        "train",
        "demo",
        "visualize",
        "sweep",
        "configs",
        "bench",
    )
}
