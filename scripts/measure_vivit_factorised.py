"""Accuracy against multiply-adds of the grid merging options on ViViT models 3 and 4.

Trains ViViT model 3 (factorised self-attention, ``time_space``) and model 4 (factorised
dot-product attention) at the demo's size with the demo's recipe (``configs/vivit_demo.py``:
6 layers, width 96, 16 frames of 32x32 in 2x8x8 tubelets = 8 frames of 16 tokens, the synthetic
dataset, AdamW at 2e-3 with 50 warm-up steps, batch 32), only the attention type changed, the
``gap`` classifier (Scenic's rule for these types) and, for model 4, 4 heads instead of 3 (its
heads split evenly between time and space). Then evaluates each on the 256 test clips at r=0
and with each merging option over r, and writes ``results.json`` and ``results.md``::

    python scripts/measure_vivit_factorised.py --workdir out/vivit_factorised

``--init demo`` (the default) fine-tunes from the shipped demo checkpoint (model 1): its
embedding, blocks, final norm and head, the class token and its position dropped; model 3's
time and space attention (and LayerNorms) both start from model 1's attention, model 4's heads
are model 1's projections regrouped from 3 heads of 32 into 4 of 24. Trained from scratch
(``--init scratch --epochs 12``, the demo's full recipe), model 3 stayed near chance (16.4%
after 768 steps), so the curves would say nothing. A trained model in the workdir is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ml_collections

from vtm_jax.config.loading import load_config
from vtm_jax.merging import MergingSettings

MODELS = {
    "model3": ("factorized_self_attention_block", "time_space", 3),
    "model4": ("factorized_dot_product_attention", None, 4),
}
# (option, settings): r per frame of 16 tokens; temporal_r frames (of 8) per layer.
SETTINGS = [("r=0", {})]
SETTINGS += [(f"aligned r={r}", {"mode": "merge", "r": r}) for r in (2, 3, 4, 6)]
SETTINGS += [
    (f"per_frame r={r}", {"mode": "merge", "r": r, "factorised_groups": "per_frame"})
    for r in (2, 3, 4, 6)
]
SETTINGS += [(f"temporal_r={t}", {"mode": "merge", "temporal_r": t}) for t in (1, 2)]
SETTINGS += [("aligned r=2 + temporal_r=1", {"mode": "merge", "r": 2, "temporal_r": 1})]


def model_config(name: str, data_dir: str) -> ml_collections.ConfigDict:
    """The demo's config with model ``name``'s attention (see the module docstring)."""
    kind, order, heads = MODELS[name]
    config = load_config(
        "vivit_demo", command="train", values={"dataset_configs.data_dir": data_dir}
    )
    with config.unlocked():
        config.experiment_name = f"vivit_demo_{name}"
        attention = {"type": kind} if order is None else {"type": kind, "attention_order": order}
        config.model.attention_config = ml_collections.ConfigDict(attention)
        config.model.classifier = "gap"
        config.model.num_heads = heads
    return config


def from_demo(name: str, fresh: dict) -> dict:
    """The shipped demo checkpoint's parameters laid out as model ``name``'s (``fresh``: the
    model's own initial parameters, whose shapes the result must have)."""
    import numpy as np

    from vtm_jax.checkpoints.store import load_checkpoint
    from vtm_jax.jobs.demo import shipped_checkpoint

    demo, _ = load_checkpoint(shipped_checkpoint())
    demo = {k: v for k, v in demo.items() if k != "cls"}  # no class token in models 3 and 4
    params = {**demo, "Transformer": dict(demo["Transformer"])}
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    params["Transformer"]["posembed_input"] = {"pos_embedding": table[:, 1:]}
    heads = fresh["Transformer"]["encoderblock_0"]
    for layer in (k for k in demo["Transformer"] if k.startswith("encoderblock_")):
        block = demo["Transformer"][layer]
        attention = block["MultiHeadDotProductAttention_0"]
        if name == "model3":
            new = {"LayerNorm_mlp": block["LayerNorm_1"], "MlpBlock": block["MlpBlock_0"]}
            for axis in ("time", "space"):
                new[f"LayerNorm_{axis}"] = block["LayerNorm_0"]
                new[f"MultiHeadDotProductAttention_{axis}"] = attention
        else:
            shapes = heads["MultiHeadDotProductAttention_0"]
            regrouped = {
                part: {k: np.reshape(v, shapes[part][k].shape) for k, v in attention[part].items()}
                for part in attention
            }
            new = {**block, "MultiHeadDotProductAttention_0": regrouped}
        params["Transformer"][layer] = new
    return params


def trained(name: str, workdir: Path, data_dir: str, init: str, epochs: int) -> tuple[str, dict]:
    """The exported model of ``name`` (trained here unless already there) and its summary."""
    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.jobs.training import train as train_module

    run_dir = workdir / name
    export = run_dir / "model"
    if (export / "model.json").exists():
        return str(export), dict(load_record(str(export)).trained)
    config = model_config(name, data_dir)
    with config.unlocked():
        config.num_training_epochs = epochs
        config.experiment_name += f"_from_{init}"
    fresh_state = train_module.init_state

    def demo_state(model, optimizer, seed, clip_shape):
        # The train job has no init_from: its initial state is swapped here, the optimiser
        # state made anew for the demo's parameters.
        state = fresh_state(model, optimizer, seed, clip_shape)
        params = from_demo(name, state["params"])
        return {**state, "params": params, "opt_state": optimizer.init(params)}

    if init == "demo":
        train_module.init_state = demo_state
    try:
        train_module.train(config, str(run_dir), progress=False)
    finally:
        train_module.init_state = fresh_state
    return str(export), dict(load_record(str(export)).trained)


def evaluate_all(checkpoint: str, config: ml_collections.ConfigDict) -> list[dict]:
    """Top-1 on the synthetic test split and analytic MACs of every setting."""
    from vtm_jax.checkpoints.store import load_record
    from vtm_jax.data.datasets import open_split
    from vtm_jax.jobs.evaluation.evaluate import evaluate
    from vtm_jax.models.registry import build_model

    data = config.dataset_configs
    source = open_split(
        config.dataset_name, "test", data_dir=data.data_dir, config=dict(data.builder_options)
    )
    record = load_record(checkpoint)
    rows = []
    for option, values in SETTINGS:
        merging = MergingSettings.from_dict(values)
        began = time.perf_counter()
        results = evaluate(
            checkpoint, source, merging=merging, batch_size=64, attention="xla", progress=False
        )
        model = build_model(record, merging)
        plan = model.grid_plan(record.num_frames, record.image_size)
        rows.append(
            {
                "option": option,
                "settings": merging.to_dict(),
                "top1": results["metrics"]["top1"],
                "gmacs": model.analytic_macs(record.num_frames, record.image_size)["total"] / 1e9,
                "tokens_out": [p.frames_out * p.space_out for p in plan],
                "seconds": round(time.perf_counter() - began, 1),
            }
        )
        print(f"  {option}: top-1 {rows[-1]['top1']:.4f}, {rows[-1]['gmacs']:.4f} GMACs")
    return rows


def table(name: str, rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"| {name} | top-1 | change | GMACs/clip | of r=0 | tokens after each layer |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        change = 100 * (row["top1"] - base["top1"])
        lines.append(
            f"| {row['option']} | {100 * row['top1']:.2f} | {change:+.2f} | {row['gmacs']:.4f} | "
            f"{row['gmacs'] / base['gmacs']:.0%} | {', '.join(map(str, row['tokens_out']))} |"
        )
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("out/vivit_factorised"))
    parser.add_argument("--data-dir", default="out/data", help="the synthetic set (built once)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--init", choices=("demo", "scratch"), default="demo")
    parser.add_argument("--epochs", type=int, default=4, help="of the 2048 training clips")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = {"machine": None, "models": {}}
    for name in args.models:
        print(f"{name}: training (or reusing) in {args.workdir / name}")
        began = time.perf_counter()
        checkpoint, summary = trained(name, args.workdir, args.data_dir, args.init, args.epochs)
        train_s = round(time.perf_counter() - began, 1)
        rows = evaluate_all(checkpoint, model_config(name, args.data_dir))
        out["models"][name] = {
            "checkpoint": checkpoint,
            "trained": summary,
            "rows": rows,
            "wall_seconds_training_step": train_s,
        }
    out["machine"] = machine()
    (args.workdir / "results.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    text = "\n\n".join(table(name, m["rows"]) for name, m in out["models"].items())
    (args.workdir / "results.md").write_text(f"{text}\n\nmachine: {out['machine']}\n")
    print(f"\n{text}\n\nmachine: {out['machine']}")


if __name__ == "__main__":
    main()
