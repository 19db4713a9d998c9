"""Writes the Colab notebooks of this folder from their sources in src/: ``python colab/build_notebooks.py``.

Each notebook ``<name>.ipynb`` has one source, ``src/<name>.py``, in jupytext's percent format: a ``# %%`` line
starts a code cell, ``# %% [markdown]`` a markdown cell (its lines commented with ``# ``), and
``# %% tags=["parameters"]`` the cell tagged 'parameters' (papermill's convention; the test injects WORKDIR after
it). Edit the source, run this script, commit both. The notebooks are stripped (no outputs, no execution counts),
with cell ids numbered by position and Colab's metadata, so that rebuilding unchanged sources changes no byte.
``tests/experiments/test_notebooks.py`` executes every notebook (``MOEJAX_NOTEBOOK_BUDGET=ci``) and checks that this
script reproduces the committed files byte for byte. ``--check`` writes nothing and exits with status 1 when a notebook
differs from its source. The format is parsed here rather than by jupytext so that building needs nothing beyond
the standard library; ``jupytext --to ipynb src/<name>.py`` reads the same cells.

Every notebook starts the same way: a cell installing moejax when it is not importable (Colab; the ablation
notebook clones the repository instead), a cell detecting the platform, and the 'parameters' cell choosing the
budget: ``MOEJAX_NOTEBOOK_BUDGET`` when set (``ci``: a few steps of a small model, for the test), else ``cpu`` on
a CPU (minutes) or ``full`` on a TPU or GPU.
"""
from __future__ import annotations

import json
import pathlib
import re
import sys

COLAB_DIR = pathlib.Path(__file__).resolve().parent
SOURCES = COLAB_DIR / "src"
NOTEBOOKS = sorted(path.stem for path in SOURCES.glob("*.py"))
HEADER = re.compile(r'# %%(?P<markdown> \[markdown\])?(?: tags=(?P<tags>\[.*\]))?')


def read_cells(path: pathlib.Path) -> list[dict]:
    """The cells of a percent-format source, as .ipynb cells without ids, each source one string."""
    before, *chunks = re.split(r"^(?=# %%)", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if before.strip():
        raise ValueError(f"{path}: text before the first '# %%' line")
    cells = []
    for chunk in chunks:
        header, _, body = chunk.partition("\n")
        match = HEADER.fullmatch(header)
        if match is None:
            raise ValueError(f"{path}: unknown cell line {header!r}")
        lines = body.strip("\n").split("\n")
        if not match["markdown"]:
            metadata = {"tags": json.loads(match["tags"])} if match["tags"] else {}
            cells.append({"cell_type": "code", "execution_count": None, "metadata": metadata, "outputs": [],
                          "source": "\n".join(lines)})
            continue
        if match["tags"] or any(line != "#" and not line.startswith("# ") for line in lines):
            raise ValueError(f"{path}: a markdown cell has tags or a line not commented with '# ': {header!r}")
        cells.append({"cell_type": "markdown", "metadata": {}, "source": "\n".join(line[2:] for line in lines)})
    return cells


def render(name: str) -> str:
    """The .ipynb text of notebook ``name``: nbformat 4.5, outputs stripped, cell ids fixed by position."""
    cells = [{**cell, "id": f"{name}-{index:02d}", "source": cell["source"].splitlines(keepends=True)}
             for index, cell in enumerate(read_cells(SOURCES / f"{name}.py"))]
    notebook = {
        "cells": cells,
        "metadata": {
            "colab": {"name": f"{name}.ipynb", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = COLAB_DIR / f"{name}.ipynb"
        text = render(name)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text, encoding="utf-8")
    verb = "differ from their sources" if check else "written"
    print(f"{', '.join(stale)}: {verb}" if stale else "all notebooks up to date")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
