"""vtm-jax against its PyTorch peers, both sides in one run, repeated: one command.

Each run times, back to back and each in its own process (so no two thread pools compete):

1. ``vtm-jax bench --config=CONFIG`` (r=0 and the config's r; its JSON carries the analytic
   GMACs and a float32 matmul peak measured by JAX in the same process);
2. ``scripts/bench_pytorch.py`` under the project's transformers 5.x: HF ViViT ``sdpa`` and
   ``eager`` at r=0, the paper's method (HF ViViT, eager attention + proportional attention +
   merging) at r, and torch's float32 matmul peak;
3. the same under transformers 4.x (4.46, the version the paper's code patches), when
   ``--transformers4-python`` names an interpreter that has it
   (``bash scripts/bench_setup_transformers4.sh`` makes one in /tmp/tf446).

for every batch in ``--batches``, and writes ``OUT/report.md`` / ``report.json``: seconds per
clip (median of the timed passes), achieved GFLOP/s (analytic FLOPs, 2 per MAC, the same
count for every implementation) next to the matmul peak of that run, the fastest peer, and
the issue's targets per run: vtm-jax r=0 against the fastest HF ViViT at r=0, vtm-jax at r
against the fastest run of the paper's method at r, and vtm-jax's speedup as a share of its
FLOP limit.

  .venv/bin/python scripts/bench_side_by_side.py --runs 3 --batches 1 8 \\
      --transformers4-python /tmp/tf446/bin/python --output out/side_by_side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd: list[str], log: str) -> None:
    """Run ``cmd`` from the repository root, echo its output and keep it in ``log``."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("  ", "mode=", "|")):  # keep the console short
                print("  " + line, end="", flush=True)
        if proc.wait():
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def one_run(args: argparse.Namespace, index: int, batch: int) -> dict[str, Any]:
    """Every measurement of one run at one batch; the raw JSON files stay in ``args.output``."""
    stem = os.path.join(args.output, f"run{index}_b{batch}")
    common = [f"--iterations={args.iterations}", f"--warmup={args.warmup}"]
    vtm_cmd = [
        sys.executable, "-m", "vtm_jax.cli", "bench", f"--config={args.config}",
        f"--config.bench.batch_size={batch}", f"--config.bench.iterations={args.iterations}",
        f"--config.bench.warmup={args.warmup}", f"--config.token_merging.r={args.r}",
        *args.vtm_arg, f"--output={stem}_vtm.json",
    ]  # fmt: skip
    run(vtm_cmd, f"{stem}_vtm.log")
    with open(f"{stem}_vtm.json") as f:
        vtm = json.load(f)
    data = vtm["config"]["dataset_configs"]
    shape = [f"--frames={data['num_frames']}", f"--size={data['crop_size']}"]
    peers = []
    pythons = [("5", sys.executable)]
    if args.transformers4_python:
        pythons.append(("4", args.transformers4_python))
    for major, python in pythons:
        runs = args.peers if batch == 1 else args.peers_batched
        out = f"{stem}_torch_tf{major}.json"
        cmd = [python, "scripts/bench_pytorch.py", f"--r={args.r}", f"--batch={batch}", *common, *shape,
               f"--runs={runs}", f"--output={out}"]  # fmt: skip
        run(cmd, out[: -len(".json")] + ".log")
        with open(out) as f:
            peers.append(json.load(f))
    return {"batch": batch, "run": index, "vtm": vtm, "torch": peers}


def summarise(measured: dict[str, Any]) -> dict[str, Any]:
    """Rows (seconds per clip, GFLOP/s, share of peak) and target ratios of one run."""
    batch, vtm = measured["batch"], measured["vtm"]
    by_r = {r["r"] if r["mode"] != "none" else 0: r for r in vtm["results"]}
    gmacs = {r: row["gmacs_per_clip"] for r, row in by_r.items()}
    peaks = {"jax": vtm["run"]["matmul_peak_gflop_per_s"]}
    rows = []
    for r, row in sorted(by_r.items()):
        median = statistics.median(row["seconds"]) / batch
        rows.append({"who": f"vtm-jax r={r}", "kind": "vtm", "r": r, "s_per_clip": median})
    for peer in measured["torch"]:
        tf = peer["transformers"]
        peaks[f"torch (transformers {tf})"] = peer["matmul_peak_gflop_per_s"]
        for key, res in peer["results"].items():
            kind = "paper" if key.startswith("paper") else "hf"
            label = (
                f"paper's method r={res['r']} (transformers {tf})"
                if kind == "paper"
                else f"HF ViViT {key.split('_')[1]} r=0 (transformers {tf})"
            )
            rows.append(
                {"who": label, "kind": kind, "r": res["r"], "s_per_clip": res["median_s"] / batch}
            )
    peak = max(peaks.values())
    for row in rows:
        flops = 2 * gmacs.get(row["r"], float("nan"))
        row["gflop_per_s"] = flops / row["s_per_clip"]
        row["share_of_peak"] = row["gflop_per_s"] / peak
    vtm0 = next(r for r in rows if r["kind"] == "vtm" and r["r"] == 0)
    vtm_r = next((r for r in rows if r["kind"] == "vtm" and r["r"] != 0), None)
    hf = [r for r in rows if r["kind"] == "hf"]
    paper = [r for r in rows if r["kind"] == "paper"]
    targets: dict[str, Any] = {}
    if hf:
        best = min(hf, key=lambda r: r["s_per_clip"])
        targets["fastest_hf_r0"] = best["who"]
        targets["r0_vs_fastest_hf"] = best["s_per_clip"] / vtm0["s_per_clip"]
    if vtm_r is not None:
        row = by_r[vtm_r["r"]]
        targets["speedup"] = vtm0["s_per_clip"] / vtm_r["s_per_clip"]
        targets["flop_limit"] = row["flop_limit"]
        targets["share_of_flop_limit"] = targets["speedup"] / row["flop_limit"]
        if paper:
            best = min(paper, key=lambda r: r["s_per_clip"])
            targets["fastest_paper"] = best["who"]
            targets["r_vs_fastest_paper"] = best["s_per_clip"] / vtm_r["s_per_clip"]
    return {
        "run": measured["run"],
        "batch": batch,
        "peaks": peaks,
        "peak": peak,
        "rows": rows,
        "targets": targets,
    }


def report_md(summaries: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    for s in summaries:
        peaks = ", ".join(f"{k} {v:.0f}" for k, v in s["peaks"].items())
        lines += [
            f"### Run {s['run']}, batch {s['batch']} (float32 matmul peak, GFLOP/s: {peaks})",
            "",
            "| run | s / clip | GFLOP/s | share of matmul peak |",
            "|---|---|---|---|",
        ]
        for r in s["rows"]:
            lines.append(
                f"| {r['who']} | {r['s_per_clip']:.3f} | {r['gflop_per_s']:.0f} | "
                f"{100 * r['share_of_peak']:.0f}% |"
            )
        t = s["targets"]
        lines.append("")
        shares = [r["share_of_peak"] for r in s["rows"]] + [t.get("share_of_flop_limit", 1.0)]
        if max(shares) > 1.05:
            lines.append(
                "* **Not reliable:** a rate above its ceiling (over 105% of the matmul peak or "
                "of the FLOP limit) means the machine's load changed between measurements."
            )
        if "r0_vs_fastest_hf" in t:
            lines.append(
                f"* r=0: fastest peer {t['fastest_hf_r0']}; vtm-jax is "
                f"**{t['r0_vs_fastest_hf']:.2f}x** its speed (target >= 1.0, aim 1.1)"
            )
        if "r_vs_fastest_paper" in t:
            lines.append(
                f"* r: fastest {t['fastest_paper']}; vtm-jax is "
                f"**{t['r_vs_fastest_paper']:.2f}x** its speed (target >= 2.0, aim 2.5)"
            )
        if "speedup" in t:
            lines.append(
                f"* vtm-jax speedup {t['speedup']:.2f}x of a {t['flop_limit']:.2f}x FLOP limit: "
                f"**{100 * t['share_of_flop_limit']:.0f}%** (target >= 97%)"
            )
        lines.append("")
    lines += ["### Targets over all runs", "", "| batch | target | per run | met in every run |"]
    lines.append("|---|---|---|---|")
    for batch in sorted({s["batch"] for s in summaries}):
        runs = [s for s in summaries if s["batch"] == batch]
        for key, floor, label in (
            ("r0_vs_fastest_hf", 1.0, "vtm-jax r=0 / fastest HF r=0 >= 1.0"),
            ("r_vs_fastest_paper", 2.0, "vtm-jax r / fastest paper's method r >= 2.0"),
            ("share_of_flop_limit", 0.97, "speedup >= 97% of FLOP limit"),
        ):
            values = [s["targets"].get(key) for s in runs]
            if any(v is None for v in values):
                continue
            shown = ", ".join(f"{v:.2f}" for v in values)
            met = "yes" if all(v >= floor for v in values) else "no"
            lines.append(f"| {batch} | {label} | {shown} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vivit_b_k400")
    parser.add_argument("--r", type=int, default=300)
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole comparison")
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peers", default="sdpa,eager,paper", help="PyTorch runs at batch 1")
    parser.add_argument(
        "--peers-batched",
        default="sdpa,eager,paper",
        help="PyTorch runs at batches above 1 (eager is the slowest peer there)",
    )
    parser.add_argument("--transformers4-python", help="a python with transformers 4.x + torch")
    parser.add_argument(
        "--vtm-arg", action="append", default=[], help="extra vtm-jax bench flag (repeatable)"
    )
    parser.add_argument("--output", default="out/side_by_side")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite OUT/report.md from OUT/report.json"
    )
    args = parser.parse_args()
    if args.render:
        with open(os.path.join(args.output, "report.json")) as f:
            saved = json.load(f)
        header = f"## Side by side, started {saved['started']}\n\n`{' '.join(saved['argv'])}`"
        text = report_md(saved["runs"], header)
        with open(os.path.join(args.output, "report.md"), "w") as f:
            f.write(text)
        print(text)
        return
    os.makedirs(args.output, exist_ok=True)
    start = time.strftime("%Y-%m-%d %H:%M")
    summaries = []
    for index in range(1, args.runs + 1):
        for batch in args.batches:
            print(f"== run {index} of {args.runs}, batch {batch}", flush=True)
            summaries.append(summarise(one_run(args, index, batch)))
            with open(os.path.join(args.output, "report.json"), "w") as f:
                json.dump({"started": start, "argv": sys.argv, "runs": summaries}, f, indent=2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    header = (
        f"## Side by side, started {start} ({os.cpu_count()} CPUs, load average {load:.1f} "
        f"at the end)\n\n`{' '.join([os.path.relpath(sys.executable, REPO), *sys.argv])}`"
    )
    text = report_md(summaries, header)
    with open(os.path.join(args.output, "report.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
