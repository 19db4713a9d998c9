"""The Colab notebooks of colab/ run top to bottom, are stored without outputs, and are what
colab/build_notebooks.py writes from their sources colab/src/<name>.py (jupytext's percent format).

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
from tests.helpers_configs import REPO

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
    """Sources and notebooks cannot drift: each committed notebook is, byte for byte, what its source builds."""
    builder = load_builder()
    assert sorted(f"{name}.ipynb" for name in builder.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    for name in builder.NOTEBOOKS:
        assert (COLAB / f"{name}.ipynb").read_text(encoding="utf-8") == builder.render(name), \
            f"colab/{name}.ipynb differs from colab/src/{name}.py: run python colab/build_notebooks.py"
    assert json.loads(builder.render("quickstart"))["nbformat"] == 4


def test_notebooks_share_their_setup():
    """Every 'parameters' cell starts with the same budget choice, and every notebook but reproduce_ablation (which
    clones the repository instead) installs moejax with the same lines."""
    builder = load_builder()
    cells = {name: builder.read_cells(builder.SOURCES / f"{name}.py") for name in builder.NOTEBOOKS}
    install = cells["quickstart"][1]["source"]
    budget = next(c for c in cells["quickstart"] if c["metadata"].get("tags") == ["parameters"])["source"]
    budget = budget[:budget.index("\n\n", budget.index("BUDGET = "))]
    for name, notebook in cells.items():
        parameters = [c["source"] for c in notebook if "parameters" in c["metadata"].get("tags", [])]
        assert len(parameters) == 1 and parameters[0].startswith(budget + "\n\n"), name
        if name != "reproduce_ablation":
            assert any(c["source"].endswith(install) for c in notebook if c["cell_type"] == "code"), name


def test_percent_format(tmp_path):
    """Markdown lines lose their '# ', a tags= header becomes the cell's tags, blank lines between cells go."""
    source = tmp_path / "example.py"
    source.write_text('# %% [markdown]\n# # Title\n#\n# text\n\n# %% tags=["parameters"]\nx = 1\n\n\n'
                      '# %%\ndef f():\n\n    return x\n')
    assert load_builder().read_cells(source) == [
        {"cell_type": "markdown", "metadata": {}, "source": "# Title\n\ntext"},
        {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["parameters"]}, "outputs": [],
         "source": "x = 1"},
        {"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
         "source": "def f():\n\n    return x"},
    ]
    source.write_text("# %% [markdown]\nnot commented\n")
    with pytest.raises(ValueError, match="not commented"):
        load_builder().read_cells(source)
