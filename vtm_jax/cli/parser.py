"""The ``vtm-jax`` argument parser: one subparser per command, flags and their help."""

from __future__ import annotations

import argparse
from typing import Any

from vtm_jax.checkpoints.convert.sources import SOURCES
from vtm_jax.merging import RULES

MODE_HELP = f"merging mode: {', '.join(RULES)}, or a 'package.module:attribute' rule"
# The names are vtm_jax.models.layers.DTYPES' (checked there); eval, bench and train take
# the same setting as eval.dtype, bench.dtype and training.dtype in their configs.
DTYPE_HELP = (
    "what the model computes in: float32 (default) or bfloat16 (activations and matmuls; "
    "parameters, softmax, merge arithmetic and logits stay float32)"
)


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
    sub.add_parser("configs", help="list the shipped configs (--config=NAME runs one)")
    for name, writes in sub.choices.items():  # every command that writes a result
        if name != "configs":
            writes.add_argument(
                "--overwrite",
                action="store_true",
                help="replace an existing output that is not this command's own (a user's file, "
                "another command's); never one of its inputs",
            )
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
    pred.add_argument("--dtype", help=DTYPE_HELP)
    pred.add_argument("--save-logits", metavar="OUT.npy")
    return pred


def _add_bench(sub: Any) -> argparse.ArgumentParser:
    bench = sub.add_parser(
        "bench",
        help="throughput at r=0 and the config's merging",
        description="--config=NAME (a shipped config) or FILE.py, and --config.field=value overrides, as in Scenic",
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
        description="--config=NAME (a shipped config) or FILE.py, and --config.field=value overrides, as in Scenic",
    )
    evaluate.add_argument(
        "--workdir",
        help="directory for eval.json, eval.md (table) and TensorBoard events (rerun to "
        "resume); or --config.results_path=FILE.json for the results file alone, with FILE.md",
    )
    return evaluate


def _add_train(sub: Any) -> argparse.ArgumentParser:
    train = sub.add_parser(
        "train",
        help="train or fine-tune with optax (optionally with merging); resumes when rerun",
        description="--config=NAME (a shipped config) or FILE.py, and --config.field=value overrides, as in Scenic",
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
    demo.add_argument("--dtype", help=DTYPE_HELP + " (default: the config's demo.dtype)")
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
        help="JSON: model -> dataset -> {checkpoint, data_dir, manual_dir[, config, overrides]}; "
        "or 'demo': the shipped demo checkpoint on the synthetic dataset",
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
