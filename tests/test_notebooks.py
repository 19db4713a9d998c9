"""The Colab notebooks of colab/ run top to bottom, are stored without outputs, and are what
colab/build_notebooks.py generates.

Each notebook runs in a fresh python3 kernel with the repository root as its working directory,
MOEJAX_NOTEBOOK_BUDGET=ci (a few steps of a small model), a corpus shared by the test session (MOEJAX_DATA_DIR)
and its WORKDIR injected after the cell tagged 'parameters' (papermill's convention), so that runs land in the
test's tmp_path. The kernel gets the test environment without the forced host device count of tests/conftest.py:
a notebook that needs 8 devices (expert_parallelism.ipynb) forces them itself in its first cell, like on Colab.
"""
import importlib.util
import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests import helpers_env

REPO = pathlib.Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
CELL_TIMEOUT_S = 300


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", COLAB / "build_notebooks.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


def kernel_env(data_dir: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ, MOEJAX_NOTEBOOK_BUDGET="ci", MOEJAX_DATA_DIR=str(data_dir))
    flags = helpers_env.xla_flags()  # one device
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def with_workdir(notebook: nbformat.NotebookNode, workdir: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook with a cell setting WORKDIR inserted after its 'parameters' cell."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "every notebook has exactly one cell tagged 'parameters'"
    cell = nbformat.v4.new_code_cell(f"WORKDIR = {str(workdir)!r}", metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged[0] + 1, cell)
    return notebook


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, data_dir, tmp_path):
    notebook = with_workdir(nbformat.read(path, as_version=4), tmp_path / "runs")
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}})
    client.execute(env=kernel_env(data_dir))  # raises CellExecutionError naming the cell on any error
    images = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if "image/png" in output.get("data", {})]
    assert images, f"{path.name} drew no plot"


def test_notebooks_are_stripped():
    assert NOTEBOOKS, "colab/ holds no notebook"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, \
                    f"{path.name} cell {index} holds outputs: regenerate with python colab/build_notebooks.py"


def test_generator_reproduces_the_notebooks():
    builder = load_builder()
    assert sorted(f"{name}.ipynb" for name in builder.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for name in builder.NOTEBOOKS:
        assert (COLAB / f"{name}.ipynb").read_text(encoding="utf-8") == builder.render(name), \
            f"colab/{name}.ipynb differs from colab/build_notebooks.py: run python colab/build_notebooks.py"
    assert json.loads(builder.render("quickstart"))["nbformat"] == 4
