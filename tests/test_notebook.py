"""examples/quickstart.ipynb runs from top to bottom, so it never goes stale."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")


def test_the_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Committed without outputs: what a reader sees comes from their own run.
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    # The kernel inherits the environment (JAX_PLATFORMS=cpu, HF_HUB_OFFLINE=1) and runs in a
    # temporary directory; an exception in any cell fails the test with that cell's traceback.
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    outputs = {
        kind
        for cell in code
        for output in cell.outputs
        for kind in getattr(output, "data", {"text": None})
    }
    assert {"image/png", "text/markdown"} <= outputs  # the plots, the picture and the table
    table = next(
        output.data["text/markdown"]
        for cell in code
        for output in cell.outputs
        if "text/markdown" in getattr(output, "data", {})
    )
    assert table.count("\n") == 5 and "| merge | 3 |" in table
