# %% [markdown]
# # Reproduce an ablation table
#
# `python -m experiments.reproduce <table>` trains every row of a table in `experiments/tables/` at several
# seeds (each run is `python -m moejax.main` in its own process, resumable), then writes a markdown table
# (mean ± std over seeds, the paper's numbers beside them, within-seed differences against a reference row)
# and plots. This notebook runs one table and renders what it wrote.
#
# The tables and `experiments/` live in the repository, not in the pip package, so this notebook works in a
# checkout: on Colab the first cell clones the repository and installs it in editable mode. The runs are
# subprocesses; the notebook itself never imports jax, so on a TPU or GPU runtime the runs get the
# accelerator.

# %%
# Work in a checkout of the repository (clone it on Colab) with moejax installed from it.
import os
import pathlib
import subprocess
import sys

REPO_URL = "https://github.com/moejax/moejax"
if not pathlib.Path("experiments/reproduce.py").exists():
    if not pathlib.Path("moejax").exists():
        subprocess.run(["git", "clone", "-q", "--depth=1", REPO_URL, "moejax"], check=True)
    os.chdir("moejax")
if subprocess.run([sys.executable, "-c", "import moejax.configs.base"], capture_output=True).returncode:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
print(f"working in {os.getcwd()}")

# %%
# The platform, asked in a subprocess: importing jax here would hold a TPU or GPU that the runs need.
probe = [sys.executable, "-c", "import jax; print(jax.default_backend(), jax.device_count())"]
platform, device_count = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.split()[-2:]
print(f"platform: {platform}, {device_count} device(s)")

# %% tags=["parameters"]
import os

# 'ci': a few steps of a small model (tests/experiments/test_notebooks.py); 'cpu': minutes on a laptop CPU;
# 'full': the preset's own budget, for a TPU or GPU runtime.
BUDGET = os.environ.get("MOEJAX_NOTEBOOK_BUDGET") or ("cpu" if platform == "cpu" else "full")

TABLE = "top_p_vs_top2"  # a file of experiments/tables/
WORKDIR = "runs/colab_reproduce_ablation"  # the runs and the results; deleted and created fresh
# ci: SMOKE_BUDGET (4 steps: tests the pipeline, the numbers mean nothing), two runs at a time;
# cpu: the table's own budget at one seed (two 600-step runs; a MoE run of the tables' width took
# about 10 minutes on 2 cores); full: three seeds
TABLE_BUDGET, SEEDS, JOBS = {"ci": ("smoke", 1, 2), "cpu": ("full", 1, 1), "full": ("full", 3, 1)}[BUDGET]

# %% [markdown]
# ## The tables
#
# A table file defines its rows (a config file with overrides, and the paper's numbers), a shared budget,
# the metrics and what the paper found; see `experiments/tables/__init__.py`. `--dry-run` prints the runs and
# their `python -m moejax.main` commands without running anything.

# %%
tables = sorted(p.stem for p in pathlib.Path("experiments/tables").glob("*.py") if not p.name.startswith("_"))
print("tables:", ", ".join(tables))
command = [sys.executable, "-m", "experiments.reproduce", TABLE, "--seeds", str(SEEDS), "--budget",
           TABLE_BUDGET, "--workdir", WORKDIR, "--results-dir", f"{WORKDIR}/results", "--jobs", str(JOBS)]
print(subprocess.run([*command, "--dry-run"], capture_output=True, text=True, check=True).stdout)

# %% [markdown]
# ## Run it
#
# Progress streams below. Interrupted (or run again without deleting the workdir), the same command skips
# the finished runs and resumes the others from their checkpoints.

# %%
import shutil

shutil.rmtree(WORKDIR, ignore_errors=True)
print("$ python -m experiments.reproduce " + " ".join(command[3:]), flush=True)
with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
    for line in process.stdout:
        print(line, end="", flush=True)
if process.returncode:
    raise RuntimeError(f"experiments.reproduce failed with status {process.returncode}; the runs' logs are "
                       f"in {WORKDIR}/<row>/seed<k>/log.txt")

# %% [markdown]
# ## The results
#
# `<table>.md` as written (its plot links are shown as images below), then the plots. `<table>.json` beside
# it holds every run's values.

# %%
import re

from IPython.display import Image, Markdown, display

results = pathlib.Path(WORKDIR) / "results"
page = (results / f"{TABLE}.md").read_text()
text, _, plots = page.partition("\n## Plots")
display(Markdown(text))
for caption, file in re.findall(r"!\[(.*?)\]\((.*?)\)", plots):
    display(Markdown(f"**{caption}**"), Image(filename=str(results / file)))

# %% [markdown]
# The same plots come from `moejax.plots` for any run directory, e.g.
# `analysis.load_heatmap("runs/colab_reproduce_ablation/top2/seed0")`, `analysis.maxvio_curves(...)` and
# `analysis.loss_curves({"top2": [...], "top_p": [...]})`; each returns a matplotlib figure.
