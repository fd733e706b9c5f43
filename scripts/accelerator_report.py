"""The accelerator check's results: one JSON document and the Markdown table made from it.

``table.json`` holds where it ran (platform, device, JAX), what ran (the model, the plan, the
budget) and every row with all its fields; ``table.md`` shows the same rows, one table line per
JSON row in the same order, for BENCHMARKS.md. Both are rewritten after every step, so a run
stopped by its time guard (or killed) leaves what it finished.
"""

from __future__ import annotations

import datetime
import os
import platform as host
from typing import Any

FORMAT = "vtm-jax-accelerator-check"
MATRIX_HEADER = (
    "| batch | dtype | backend | r | clips/s | speedup | FLOP limit | share of limit | "
    "XLA peak MiB | device peak MiB | max logit diff | rel. logit diff | compile s | note |"
)
PARITY_HEADER = "| backbone | r | backend | precision | rel. max logit error | tolerance | ok |"


def run_info() -> dict[str, Any]:
    """Where the check ran: platform, device, JAX and jaxlib versions, host, date (UTC)."""
    import jax
    import jaxlib

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device": device.device_kind,
        "devices": len(jax.devices()),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "host": host.node(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _cell(value: Any, spec: str = ".4g", scale: float = 1.0) -> str:
    return "-" if value is None else format(value / scale, spec)


def matrix_line(row: dict[str, Any]) -> str:
    """One Markdown line of a matrix row."""
    mib = 2.0**20
    ok = row["status"] == "ok"
    cells = [
        str(row["batch"]),
        row["dtype"],
        row["backend"],
        str(row["r"]),
        _cell(row["clips_per_s"]) if ok else row["status"],
        _cell(row["speedup"], ".3f"),
        _cell(row["flop_limit"], ".3f"),
        _cell(row["flop_share"], ".1%"),
        _cell(row["program_bytes"], ".1f", mib),
        _cell(row["peak_bytes_in_use"], ".1f", mib),
        _cell(row["max_logit_diff"], ".2e"),
        _cell(row["rel_logit_diff"], ".2e"),
        _cell(row["compile_s"], ".1f"),
        "" if ok else (row["reason"] or "").replace("|", "/"),
    ]
    return "| " + " | ".join(cells) + " |"


def parity_line(row: dict[str, Any]) -> str:
    """One Markdown line of a parity row."""
    error = row.get("relative_max_logit_error")
    ok = {True: "yes", False: "**no**", None: row.get("status", "-")}[row.get("ok")]
    return (
        f"| {row['backbone']} | {row['r']} | {row['backend']} | {row['precision']} | "
        f"{_cell(error, '.2e')} | {_cell(row.get('tolerance'), '.0e')} | {ok} |"
    )


def markdown(doc: dict[str, Any]) -> str:
    """The Markdown of a check document: a heading line, the matrix table, the parity table."""
    run, model = doc["run"], doc["model"]
    kind = "**Smoke run** (tiny model on the CPU: a test of the check, not a benchmark)"
    lines = [
        f"{kind if doc['smoke'] else 'Accelerator check'}: {run['device']} ({run['platform']}, "
        f"{run['devices']} device(s)), JAX {run['jax']}, {run['date']}; {doc['config']}: "
        f"{model['architecture']}, input {model['num_frames']}x{model['image_size']}x"
        f"{model['image_size']}, {model['num_layers']} layer(s), random weights; "
        f"{doc['elapsed_s']:.0f} s of a {doc['budget_s']:.0f} s budget"
        + ("" if doc["complete"] else " (**incomplete**: see the rows' notes)"),
        "",
        MATRIX_HEADER,
        "|" + "---|" * MATRIX_HEADER.count(" | ") + "---|",
        *(matrix_line(row) for row in doc["rows"]),
        "",
        f"Parity against float32 XLA attention on the host CPU ({doc['parity']['layers']} "
        "layer(s) of each backbone):",
        "",
        PARITY_HEADER,
        "|" + "---|" * PARITY_HEADER.count(" | ") + "---|",
        *(parity_line(row) for row in doc["parity"]["rows"]),
    ]
    return "\n".join(lines) + "\n"


def write(out_dir: str, doc: dict[str, Any]) -> tuple[str, str]:
    """``out_dir/table.json`` and ``out_dir/table.md``, each replaced whole."""
    from vtm_jax.outputs import atomic_file, write_json

    json_path = os.path.join(out_dir, "table.json")
    md_path = os.path.join(out_dir, "table.md")
    write_json(json_path, doc, indent=2)
    with atomic_file(md_path) as f:
        f.write(markdown(doc))
    return json_path, md_path
