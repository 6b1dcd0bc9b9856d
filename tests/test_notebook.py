"""The interplay walkthrough notebook runs top to bottom (nbclient, a fresh kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "interplay_walkthrough.ipynb"


@pytest.mark.slow
def test_interplay_walkthrough_executes(tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=900,  # per cell; the training cell takes about 30 s on one CPU
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on failure

    run_dir = tmp_path / "runs" / "interplay_walkthrough"
    assert (run_dir / "summary.json").exists()
    assert (run_dir / "interplay" / "index.json").exists()
    plots = {p.name for p in (run_dir / "plots").iterdir()}
    assert {"trajectory_pca_2d.png", "metrics_offset1.png", "interplay.html"} <= plots
    images = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert len(images) >= 4  # metrics and the three projections, inline
