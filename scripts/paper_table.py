"""Run the paper's table: every reduction mode at the paper's r, for each (model, dataset) you have.

  .venv/bin/python scripts/paper_table.py --runs runs.json --out out/paper_table.md [--limit N]

``runs.json`` names a converted checkpoint and the data for each pair you have, e.g.

  {"vivit": {"k400": {"checkpoint": "ckpt/vivit_k400", "data_dir": "data",
                      "manual_dir": "/datasets/kinetics400"}},
   "videomae": {"ek100": {...}}}

Datasets: k400, ssv2, ek100 (the paper's) and synthetic (configs/vivit_synthetic.py). Each run
goes through `vtm-jax eval` with configs/<model>_b_<dataset>.py, writes its results JSON under
the output's folder (so an interrupted table resumes), and the table is written as Markdown in
the paper's layout: top-1 per dataset, EPIC-KITCHENS action / verb / noun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vtm_jax.cli import main as vtm_jax  # noqa: E402
from vtm_jax.paper import HYBRID_THRESHOLD, PAPER_R  # noqa: E402

MODES = ("none", "random_drop", "drop", "random_merge", "merge", "hybrid")
COLUMNS = [
    ("K400", "k400", "top1"),
    ("SSv2", "ssv2", "top1"),
    ("Synthetic", "synthetic", "top1"),
    ("EK-100 Action", "ek100", "action_top1"),
    ("EK-100 Verb", "ek100", "verb_top1"),
    ("EK-100 Noun", "ek100", "noun_top1"),
]


def config_file(model: str, dataset: str) -> str:
    name = "vivit_synthetic" if dataset == "synthetic" else f"{model}_b_{dataset}"
    return os.path.join(REPO, "configs", f"{name}.py")


def run_one(
    model: str, dataset: str, run: dict, mode: str, out_dir: str, limit: int | None
) -> dict:
    results = os.path.join(out_dir, f"{model}_{dataset}_{mode}.json")
    args = [
        "eval",
        f"--config={config_file(model, dataset)}",
        f"--config.checkpoint={run['checkpoint']}",
        f"--config.dataset_configs.data_dir={run['data_dir']}",
        f"--config.results_path={results}",
        f"--config.token_merging.mode={mode}",
    ]
    if run.get("manual_dir"):
        args.append(f"--config.dataset_configs.manual_dir={run['manual_dir']}")
    if run.get("r") is not None:
        args.append(f"--config.token_merging.r={run['r']}")
    if limit is not None:
        args.append(f"--config.eval.limit={limit}")
    if vtm_jax(args) != 0:
        raise SystemExit(f"eval failed: {model} {dataset} {mode}")
    with open(results) as f:
        return json.load(f)["metrics"]


def format_table(metrics: dict[tuple[str, str, str], dict], runs: dict) -> str:
    """The paper's layout: a row per (model, mode), a column per dataset metric, in percent."""
    columns = [c for c in COLUMNS if any(c[1] in runs[m] for m in runs)]
    lines = [
        "| Model | r | Reduction | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for model, datasets in runs.items():
        own_r = {run["r"] for run in datasets.values() if run.get("r") is not None}
        for mode in MODES:
            if not any((model, d, mode) in metrics for d in datasets):
                continue
            r = 0 if mode == "none" else (own_r.pop() if len(own_r) == 1 else PAPER_R[model])
            cells = []
            for _, dataset, key in columns:
                value = metrics.get((model, dataset, mode), {}).get(key)
                cells.append("-" if value is None else f"{100 * value:.2f}")
            label = "- (baseline)" if mode == "none" else mode.replace("_", " ")
            lines.append(f"| {model} | {r} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="JSON: model -> dataset -> paths")
    parser.add_argument("--out", default="out/paper_table.md")
    parser.add_argument("--limit", type=int, help="only the first N videos of each split")
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args()
    with open(args.runs) as f:
        runs = json.load(f)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "paper_runs")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {}
    for model, datasets in runs.items():
        for dataset, run in datasets.items():
            for mode in args.modes.split(","):
                if mode == "hybrid" and model not in HYBRID_THRESHOLD:
                    continue  # the paper ran hybrid for ViViT and VideoMAE only
                metrics[(model, dataset, mode)] = run_one(
                    model, dataset, run, mode, out_dir, args.limit
                )
    table = format_table(metrics, runs)
    with open(args.out, "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
