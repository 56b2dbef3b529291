"""Both notebooks execute headless on tiny settings and produce their figures (and numbers); the stored copies
carry their outputs (``make notebooks`` executes them in place), so the figures show when browsing the repository."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, env: dict[str, str], tmp_path: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    old = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


def outputs(notebook, kind: str) -> list:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if kind == "image" and "image/png" in output.get("data", {}):
                found.append(output)
            if kind == "stream" and output.get("output_type") == "stream":
                found.append(output["text"])
    return found


def test_compute_distribution_notebook(tmp_path):
    notebook = execute("compute_distribution.ipynb", {"PROSCALE_NOTEBOOK_TINY": "1"}, tmp_path)
    assert len(outputs(notebook, "image")) == 2  # Fig. 1 pies + bars, Fig. 2 reductions
    text = "".join(outputs(notebook, "stream"))
    assert "| r50 | PRO-SCALE (3,3,3) |" in text
    assert text.count("paper ") == 4 and "measured" in text


@pytest.mark.parametrize("steps", [3])
def test_inspect_predictions_notebook(tmp_path, steps):
    env = {"PROSCALE_STEPS": str(steps), "PROSCALE_WORKDIR": str(tmp_path / "work"), "WANDB_MODE": "offline"}
    notebook = execute("inspect_predictions.ipynb", env, tmp_path)
    assert len(outputs(notebook, "image")) == 3  # GT | prediction grid, the same below the threshold, query scores
    assert (tmp_path / "work" / "run" / "results.json").is_file()
    assert (tmp_path / "work" / "run" / "predictions_val.png").is_file()


# figures each stored notebook shows (the same as the executions above produce)
STORED_FIGURES = {"compute_distribution.ipynb": 2, "inspect_predictions.ipynb": 3}


@pytest.mark.parametrize("name", sorted(STORED_FIGURES))
def test_stored_notebooks_carry_their_outputs(name):
    """A notebook committed without its outputs (or with a failed cell) fails here: run `make notebooks`."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    hint = f"notebooks/{name}: run `make notebooks` and commit the result"
    assert all(cell.get("execution_count") for cell in code), f"{hint} (a cell was not executed)"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), f"{hint} (cells ran out of order)"
    errors = [o for cell in code for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{hint} (a cell failed: {errors[0].get('ename')})"
    assert len(outputs(notebook, "image")) == STORED_FIGURES[name], hint


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(STORED_FIGURES)
