"""The notebooks execute top to bottom (nbclient, the venv's python3 kernel) with tiny offline parameters."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _run(name: str, parameters: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    cells[0].source = parameters
    resources = {"metadata": {"path": str(cwd)}}
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources)
    client.execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or json.dumps(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


@pytest.mark.slow
def test_demo_notebook_runs_with_tiny_models(tmp_path):
    image = NOTEBOOKS.parent / "examples" / "astronaut.jpg"
    params = (
        'vm = "tiny_random"\nvlm = "tiny_random"\n'
        f'image_path = "{image}"\nclasses = "person;astronaut, sky, rocket"\n'
        'device = "cpu"\nshort_side = 48\nwindow_size, window_stride = 32, 16\n'
    )
    nb = _run("demo.ipynb", params, tmp_path)
    text = _text(nb)
    assert "LPOSS+: features" in text and "agree on" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # side-by-side comparison and the per-class score maps


def _fake_run(folder: Path, k: int, miou: float, method: str = "lposs_plus") -> None:
    folder.mkdir(parents=True)
    run = {
        "dataset": "voc20", "method": method, "label": "LPOSS+", "mIoU": miou,
        "overrides": [f"lp.k={k}", "dataset=voc20"],
        "config": {"lp": {"k": k}, "report": {"table": "fig10_k", "x": "lp.k"}},
        "per_image": [{"id": f"im{i}", "mIoU": miou + i} for i in range(3)],
    }
    (folder / "results.json").write_text(json.dumps(run))


@pytest.mark.slow
def test_analysis_notebook_plots_a_tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for i, (k, m) in enumerate([(10, 40.0), (20, 45.5), (40, 43.0)]):
        _fake_run(sweep / str(i), k, m)
    params = f'sweep_dir = "{sweep}"\nparam = None\nfigures_dir = "{tmp_path / "figs"}"\n'
    nb = _run("analysis.ipynb", params, tmp_path)
    text = _text(nb)
    assert "3 run(s)" in text and "best lp.k=20 -> mIoU 45.5" in text
    assert (tmp_path / "figs" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["demo.ipynb", "analysis.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
