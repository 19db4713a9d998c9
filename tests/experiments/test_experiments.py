"""Tests of experiments/reproduce.py, experiments/sweep.py (experiments/runner.py) and moejax/plots.py.

reproduce runs a toy table (two rows of the tiny config of tests/helpers_train.py cut to one MoE layer of 4 experts,
2 seeds, 4 steps) with real moejax subprocesses; the sweep reuses that table's config so that its points load their
compiled steps from the persistent compilation cache the subprocesses share. The analysis tests read a synthetic
metrics.jsonl. The statistics (t-intervals, verdicts, README summary) are tested on fixed numbers.
"""
import contextlib
import io
import json
import math
import pathlib
import re
import time
import types

import numpy as np
import pytest
from scipy import stats

from experiments import provenance, report, reproduce, runner, summary, sweep, tables
from experiments import stats as table_stats
from experiments.tables import Claim
from moejax import plots
from moejax.training import metrics
from tests import helpers_env
from tests.helpers_configs import REPO

CONFIG = str(REPO / "tests" / "helpers_train.py")
TOY_TABLE = f'''
from experiments.tables import Claim, Row
CONFIG = {CONFIG!r}
TITLE = "toy table"
PAPER = "no paper"
EXPECTED = "b below a"
SMALL = {{"model.num_layers": 1, "model.moe.num_experts": 4}}
ROWS = [Row("a", CONFIG, {{**SMALL, "model.moe.top_k": 1}}, {{"loss": 1.5}}),
        Row("b", CONFIG, {{**SMALL, "model.moe.top_k": 2}})]
REFERENCE = "a"
BUDGET = {{"train.steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 0,
          "data.eval_batches": 1, "checkpoint.every_steps": 0}}
METRICS = ["val_loss", "maxvio", "train_maxvio"]
CLAIMS = [Claim("b beats a", "b", "a"), Claim("b balances better", "b", "a", "maxvio", "lower")]
'''


@pytest.fixture(scope="module")
def subprocess_env(tmp_path_factory):
    """Runs on one host device (not the 8 forced ones of conftest.py) sharing one persistent compilation cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XLA_FLAGS", helpers_env.xla_flags())
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield


@pytest.fixture(scope="module")
def toy(tmp_path_factory, subprocess_env):
    """The toy table run once: (tables dir, workdir, results dir, console output)."""
    root = tmp_path_factory.mktemp("reproduce")
    (root / "tables").mkdir()
    (root / "tables" / "toy.py").write_text(TOY_TABLE)
    args = ["toy", "--tables-dir", str(root / "tables"), "--seeds", "2", "--jobs", "2", "--workdir",
            str(root / "runs"), "--results-dir", str(root / "results")]
    return root, args


def run_main(module, args, capsys):
    code = module.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# The tests of the toy table's run go to one pytest-xdist worker (pytest.ini: --dist loadgroup): the module fixture
# runs the table once per worker that needs it.
toy_table = pytest.mark.xdist_group("toy_table")


@pytest.fixture(scope="module")
def toy_run(toy):
    """The toy table's first run: (root, args, exit status, console output)."""
    root, args = toy
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = reproduce.main(args)
    return root, args, code, out.getvalue()


@toy_table
def test_reproduce_runs_every_row_and_seed(toy_run):
    root, _, code, out = toy_run
    assert code == 0, out
    for row in ("a", "b"):
        for seed in (0, 1):
            run = root / "runs" / row / f"seed{seed}"
            assert (run / "summary.json").exists(), out
            assert f"--config.seed={seed}" in (run / "log.txt").read_text()
    assert "done 4/4" in out and "4 finished, 0 skipped, 0 failed" in out


@toy_table
def test_reproduce_results_are_the_seed_statistics(toy_run):
    root, _, _, _ = toy_run
    md = (root / "results" / "toy.md").read_text()
    data = json.loads((root / "results" / "toy.json").read_text())
    for row in ("a", "b"):
        summaries = [json.loads((root / "runs" / row / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
        losses = [s["val_loss"] for s in summaries]
        maxvios = [np.mean([layer["maxvio"] for layer in s["moe_layers"].values()]) for s in summaries]
        line = next(line for line in md.splitlines() if line.startswith(f"| **{row}**"))
        cells = re.findall(r"(-?\d+\.\d+) ± (\d+\.\d+)", line)
        assert [float(m) for m in cells[0]] == pytest.approx([np.mean(losses), np.std(losses, ddof=1)], abs=6e-5)
        assert [float(m) for m in cells[1]] == pytest.approx([np.mean(maxvios), np.std(maxvios, ddof=1)], abs=6e-5)
        entry = next(r for r in data["rows"] if r["name"] == row)
        assert [r["metrics"]["val_loss"] for r in entry["runs"]] == losses
        assert entry["std"]["val_loss"] == pytest.approx(np.std(losses, ddof=1))
    a, b = ([json.loads((root / "runs" / r / f"seed{s}" / "summary.json").read_text())["val_loss"] for s in (0, 1)]
            for r in ("a", "b"))
    assert data["differences"]["b"]["val_loss"]["values"] == pytest.approx(np.subtract(b, a))
    assert "| **a** | 2/2 |" in md and "| 1.5 |" in md  # seeds finished, the paper's number
    order = " < ".join(sorted(("a", "b"), key=lambda r: np.mean(a if r == "a" else b)))
    seed0 = " < ".join(sorted(("a", "b"), key=lambda r: (a if r == "a" else b)[0]))
    assert f"(lowest first): {order}. Per seed: seed 0: {seed0}; seed 1: " in md
    # the claim's verdict line: b - a per seed and its 95% t-interval by hand (t_{0.975, 1} = 12.706)
    diffs = np.subtract(b, a)
    half = stats.t.ppf(0.975, 1) * np.std(diffs, ddof=1) / math.sqrt(2)
    claim = data["claims"][0]
    assert claim["values"] == pytest.approx(diffs) and claim["seeds"] == [0, 1]
    assert [claim["low"], claim["high"]] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    assert claim["verdict"] == table_stats.verdict({"low": diffs.mean() - half, "high": diffs.mean() + half}, "lower")
    line = next(line for line in md.splitlines() if line.startswith("* ") and "b beats a" in line)
    assert line.startswith(f"* **{claim['verdict']}**: b beats a.")
    assert f"[{diffs.mean() - half:.4f}, {diffs.mean() + half:.4f}], n = 2" in line
    # tokens per run and the runs' corpus fingerprint
    summary = json.loads((root / "runs" / "a" / "seed0" / "summary.json").read_text())
    config = json.loads((root / "runs" / "a" / "seed0" / "config.json").read_text())
    batch, seq = config["train"]["batch_size"], config["train"]["seq_len"]
    assert (f"**Tokens per run** (train.steps × train.batch_size × train.seq_len): 4 steps × {batch} × {seq} = "
            f"{4 * batch * seq:,} tokens.") in md
    from moejax.data.corpora import fingerprint_id
    assert f"**Corpus:** `stdlib` (Python {summary['corpus']['python']}" in md
    assert f"fingerprint id `{fingerprint_id(summary['corpus'])}`" in md
    assert json.dumps(summary["corpus"], indent=1, sort_keys=True) in md
    assert "older definition" not in md
    for plot in ("toy_loss.png", "toy_maxvio.png", "toy_load_a.png", "toy_load_b.png"):
        assert (root / "results" / plot).stat().st_size > 1000
        assert f"]({plot})" in md


@toy_table
def test_reproduce_rerun_skips_finished_runs(toy_run, capsys):
    root, args, _, _ = toy_run
    mtimes = {p: p.stat().st_mtime for p in (root / "runs").glob("*/seed*/summary.json")}
    (root / "results" / "toy.findings.md").write_text("Row b is the toy's finding.\n")
    start = time.monotonic()
    code, out, _ = run_main(reproduce, args, capsys)
    assert code == 0
    assert "4 already finished (skipped), 0 to run" in out and "] start " not in out
    assert time.monotonic() - start < 20
    assert {p: p.stat().st_mtime for p in mtimes} == mtimes
    assert "## Findings\n\nRow b is the toy's finding." in (root / "results" / "toy.md").read_text()


@toy_table
def test_render_only_rewrites_the_page_from_the_json(toy_run, capsys):
    root, args, _, _ = toy_run
    page = root / "results" / "toy.md"
    before = page.read_text()
    data = json.loads((root / "results" / "toy.json").read_text())
    code, out, _ = run_main(reproduce, [*args, "--render-only"], capsys)
    assert code == 0 and "] start " not in out
    after = page.read_text()
    assert after.startswith(before.split("\nGenerated ")[0])
    assert "without rerunning anything; the runs were made by `python -m experiments.reproduce toy " in after
    verdicts = [line for line in before.splitlines() if line.startswith("* **")]
    assert verdicts and verdicts == [line for line in after.splitlines() if line.startswith("* **")]
    assert json.loads((root / "results" / "toy.json").read_text()) == data  # the JSON is left as it was


@toy_table
def test_sweep_grid_resumes_and_sorts(toy_run, tmp_path, capsys):
    workdir = tmp_path / "sweep"
    args = ["--config", CONFIG, "--grid", "seed=0,1", "--grid", "model.moe.top_k=2", "--set", "model.num_layers=1",
            "--set", "model.moe.num_experts=4", "--set", "train.steps=4",
            "--set", "train.warmup_steps=1", "--set", "train.log_every=2", "--set", "train.eval_every=0",
            "--set", "data.eval_batches=1", "--set", "checkpoint.every_steps=0", "--workdir", str(workdir),
            "--jobs", "2"]
    code, out, err = run_main(sweep, args, capsys)
    assert code == 0, out + err
    lines = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert sorted(r["point"] for r in lines) == ["seed=0_top_k=2", "seed=1_top_k=2"]
    for r in lines:
        assert r["value"] == json.loads((pathlib.Path(r["workdir"]) / "summary.json").read_text())["val_loss"]
    summary = (workdir / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split(" | ")[1] for row in rows] == [r["point"] for r in sorted(lines, key=lambda r: r["value"])]
    for plot in ("summary_loss.png", "summary_maxvio.png"):  # the toy config has MoE layers
        assert (workdir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in summary
    code, out, _ = run_main(sweep, args, capsys)
    assert code == 0 and "2 already finished (skipped), 0 to run" in out and "] start " not in out
    assert len((workdir / "results.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("args, words", [
    (["no_such_table", "--dry-run"], ["'no_such_table'", "allowed tables:", "deepseekmoe_table1"]),
    (["deepseekmoe_table1", "--rows", "gshard,nope", "--dry-run"], ["'nope'", "dense, hash, switch, gshard"]),
    (["deepseekmoe_table1", "--budget", "huge", "--dry-run"], ["--budget='huge'", "full, smoke"]),
    (["deepseekmoe_table1", "--set", "train.steps=many", "--dry-run"], ["train.steps='many'", "not a valid int"]),
    (["deepseekmoe_table1", "--set", "train.steps", "--dry-run"], ["'train.steps'", "FIELD=VALUE"]),
    (["deepseekmoe_table1", "--set", "train.steps=9", "--budget", "smoke", "--dry-run"], ["--budget=smoke"]),
])
def test_reproduce_bad_input(args, words, capsys):
    code, _, err = run_main(reproduce, args, capsys)
    assert code == 2
    for word in words:
        assert word in err


def test_reproduce_set_gives_a_pilot_budget_in_its_own_workdir(capsys):
    code, out, _ = run_main(reproduce, ["deepseekmoe_table1", "--rows", "dense", "--seeds", "1", "--set",
                                        "train.steps=1200", "--dry-run"], capsys)
    assert code == 0
    assert "--workdir=runs/deepseekmoe_table1_train.steps=1200/dense/seed0" in out
    assert "--config.train.steps=1200" in out and "--config.train.steps=600" not in out


def test_reproduce_runs_the_tables_seeds_unless_told(tmp_path, capsys):
    """Without --seeds a table runs its SEEDS (3 when it has none); --seeds overrides it; a bad SEEDS is named."""
    def seeds_planned(text, *args):
        (tmp_path / "toy.py").write_text(text)
        code, out, err = run_main(reproduce, ["toy", "--tables-dir", str(tmp_path), "--dry-run", *args], capsys)
        assert code == 0, err
        return sorted({int(m) for m in re.findall(r"^[ab] seed(\d+) ", out, re.M)})

    assert seeds_planned(TOY_TABLE) == [0, 1, 2]
    assert seeds_planned(TOY_TABLE + "SEEDS = 5\n") == [0, 1, 2, 3, 4]
    assert seeds_planned(TOY_TABLE + "SEEDS = 5\n", "--seeds", "2") == [0, 1]
    (tmp_path / "toy.py").write_text(TOY_TABLE + "SEEDS = 0\n")
    code, _, err = run_main(reproduce, ["toy", "--tables-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "SEEDS=0 is invalid" in err
    assert tables.load_table("deepseekmoe_table1").SEEDS == 5  # the pilot's choice (its docstring)


def test_reproduce_table_with_unknown_field(tmp_path, capsys):
    (tmp_path / "bad.py").write_text(TOY_TABLE.replace("model.moe.top_k", "model.moe.topk"))
    code, _, err = run_main(reproduce, ["bad", "--tables-dir", str(tmp_path), "--dry-run"], capsys)
    assert code == 2 and "'model.moe.topk'" in err and "top_k" in err and "row 'a'" in err


@pytest.mark.parametrize("grid, words", [
    ("model.moe.top_k", ["--grid 'model.moe.top_k' is malformed", "<config field>=<value>"]),
    ("model.moe.top_k=1,,2", ["empty value"]),
    ("model.moe.top_k=1,two", ["model.moe.top_k='two'", "int"]),
    ("model.moe.top_kk=1,2", ["'model.moe.top_kk'", "top_k"]),
    ("train.learning_rate=fast", ["train.learning_rate='fast'", "float"]),
])
def test_sweep_bad_grid(grid, words, capsys):
    code, _, err = run_main(sweep, ["--config", CONFIG, "--grid", grid, "--dry-run"], capsys)
    assert code == 2
    for word in words:
        assert word in err


def test_override_types_follow_ml_collections():
    config = runner.load_config(CONFIG)
    assert runner.typed_value(config, "train.learning_rate", "1e-3", "t") == 1e-3
    assert runner.typed_value(config, "train.learning_rate", "3", "t") == 3.0
    assert runner.typed_value(config, "model.moe.top_k", "4", "t") == 4
    assert runner.typed_value(config, "model.qk_norm", "true", "t") is True
    assert runner.typed_value(config, "model.moe.router.kind", "top_p", "t") == "top_p"
    assert runner.typed_value(config, "model.moe.eval_capacity_factor", "2.0", "t") == 2.0  # default None: literal
    with pytest.raises(runner.UsageError, match="must be of type int"):
        runner.typed_value(config, "model.moe.top_k", 2.5, "t")
    assert runner.format_value(True) == "true" and runner.format_value(6e-3) == "0.006"


def synthetic_metrics(workdir, steps=(10, 20, 30), experts=4, layers=2):
    """A metrics.jsonl like the training loop's: train records with expert loads and per-layer stats, eval
    records."""
    rng = np.random.default_rng(0)
    records = []
    for i, step in enumerate(steps):
        loads = {f"layers_{l}": list(rng.dirichlet(np.ones(experts))) for l in range(layers)}  # noqa: E741
        record = {"kind": "train", "step": step, "loss": 5.0 - i, "expert_load": loads}
        for l in range(layers):  # noqa: E741
            record[f"layers_{l}_maxvio"] = max(loads[f"layers_{l}"]) * experts - 1
            record[f"layers_{l}_experts_per_token"] = 1.5 + 0.1 * i + l
        records.append(record)
    records.append({"kind": "eval", "step": steps[-1], "loss": 4.5})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "tr')
    return records


def test_load_heatmap_holds_the_loads(tmp_path):
    records = synthetic_metrics(tmp_path)
    assert metrics.read_metrics(tmp_path) == records  # the torn last line is skipped
    fig = plots.load_heatmap(tmp_path, tmp_path / "load.png")
    assert (tmp_path / "load.png").exists()
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    for layer, image in enumerate(images):
        expected = np.array([r["expert_load"][f"layers_{layer}"] for r in records if r["kind"] == "train"]).T
        np.testing.assert_array_equal(np.asarray(image.get_array()), expected)
        left, right, _, _ = image.get_extent()
        assert left < 10 < 30 < right


def test_load_heatmap_without_loads_says_so(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 5.0}) + "\n")
    with pytest.raises(ValueError, match="no train record with 'expert_load'"):
        plots.load_heatmap(tmp_path)


def test_layer_curves_hold_the_records(tmp_path):
    records = [r for r in synthetic_metrics(tmp_path) if r["kind"] == "train"]
    for function, stat in ((plots.maxvio_curves, "maxvio"),
                           (plots.experts_per_token_curves, "experts_per_token")):
        lines = function(tmp_path, tmp_path / f"{stat}.png").axes[0].get_lines()
        assert [line.get_label() for line in lines] == ["layers_0", "layers_1"]
        for layer, line in enumerate(lines):
            np.testing.assert_array_equal(line.get_xdata(), [r["step"] for r in records])
            np.testing.assert_array_equal(line.get_ydata(), [r[f"layers_{layer}_{stat}"] for r in records])


def test_loss_curves_mean_and_band_over_seeds(tmp_path):
    for seed, offset in ((0, 0.0), (1, 1.0)):
        path = tmp_path / f"seed{seed}"
        path.mkdir()
        (path / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": s, "loss": 5.0 - s / 10 + offset}) + "\n" for s in (10, 20)))
    fig = plots.loss_curves({"row": [tmp_path / "seed0", tmp_path / "seed1"]}, tmp_path / "loss.png")
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), [4.5, 3.5])
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(3.0) and band[:, 1].max() == pytest.approx(5.0)
    assert (tmp_path / "loss.png").exists()


def test_paired_differences_pair_runs_by_seed_on_shared_steps(tmp_path):
    rng = np.random.default_rng(0)
    losses = {}
    for row, steps in (("ref", (10, 20, 30)), ("moe", (10, 20, 30)), ("other", (10, 30))):
        for seed in (0, 1, 2):
            path = tmp_path / row / f"seed{seed}"
            path.mkdir(parents=True)
            losses[row, seed] = {t: float(rng.normal(5, 1)) for t in steps}
            (path / "metrics.jsonl").write_text("".join(
                json.dumps({"kind": "train", "step": t, "loss": v}) + "\n" for t, v in losses[row, seed].items()))
    rows = {"ref": {k: tmp_path / "ref" / f"seed{k}" for k in (0, 1, 2)},
            "moe": {k: tmp_path / "moe" / f"seed{k}" for k in (2, 0)},  # seed 1 unfinished
            "other": {k: tmp_path / "other" / f"seed{k}" for k in (0, 1, 2)}}
    got = plots.paired_train_differences(rows, "ref")
    steps, diffs, seeds = got["moe"]
    assert seeds == [0, 2] and list(steps) == [10, 20, 30]
    np.testing.assert_allclose(diffs, [[losses["moe", k][t] - losses["ref", k][t] for t in (10, 20, 30)]
                                       for k in (0, 2)])
    assert list(got["other"][0]) == [10, 30] and "ref" not in got
    fig = plots.paired_difference_curves(rows, "ref", tmp_path / "paired.png")
    mean_line = [line for line in fig.axes[0].get_lines() if line.get_linewidth() == 2.0][0]
    np.testing.assert_allclose(mean_line.get_ydata(), diffs.mean(0))
    assert (tmp_path / "paired.png").exists()


# ----------------------------------------------------------------------------------------------- statistics


def test_t_interval_equals_hand_computation():
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.303, abs=5e-4)  # textbook t tables
    assert stats.t.ppf(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    # [1, 2, 3]: mean 2, sd 1, half width t_{0.975, 2} / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    interval = table_stats.t_interval([1.0, 2.0, 3.0])
    assert interval["n"] == 3 and interval["mean"] == pytest.approx(2.0) and interval["std"] == pytest.approx(1.0)
    assert interval["t"] == pytest.approx(4.302653, abs=1e-6)
    assert [interval["low"], interval["high"]] == pytest.approx([2 - 2.484138, 2 + 2.484138], abs=1e-6)
    values = [-0.2604, -0.2901, -0.1727, -0.2290, -0.3012]
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / math.sqrt(5)
    interval = table_stats.t_interval(values)
    assert [interval["low"], interval["high"]] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    assert table_stats.t_interval([0.5]) == {"n": 1, "mean": 0.5, "std": None, "t": None, "low": None, "high": None}
    assert table_stats.t_interval([])["mean"] is None


@pytest.mark.parametrize("values, better, expected", [
    ([-1.0, -1.1, -0.9], "lower", "reproduced"),  # [-1.248, -0.752]: below 0, the paper's side
    ([1.0, 1.1, 0.9], "lower", "contradicted"),  # above 0: the other side
    ([1.0, 1.1, 0.9], "higher", "reproduced"),
    ([-1.0, -1.1, -0.9], "higher", "contradicted"),
    ([-3.0, -2.0, -1.0], "lower", "not resolved"),  # [-4.48, 0.48] contains 0
    ([1.0, 2.0, 3.0], "higher", "not resolved"),
    ([-5.0], "lower", "not resolved"),  # one paired seed: no interval
    ([], "lower", "not resolved"),
    ([0.0, 0.0], "lower", "not resolved"),  # [0, 0]: touches 0
])
def test_verdict(values, better, expected):
    assert table_stats.verdict(table_stats.t_interval(values), better) == expected


def test_statistics_pair_the_seeds_both_rows_finished():
    def run(seed, loss):
        return {"seed": seed, "metrics": {"val_loss": loss, "maxvio": None}, "steps": 4, "tokens": 64}
    results = {"rows": [{"name": "a", "runs": [run(0, 2.0), run(1, 2.5), run(2, 2.2)]},
                        {"name": "b", "runs": [run(0, 1.8), run(2, 2.1)]}]}
    table = types.SimpleNamespace(METRICS=["val_loss", "maxvio"], REFERENCE="a",
                                  CLAIMS=[Claim("b beats a", "b", "a"), Claim("a beats b", "a", "b"),
                                          Claim("b balances", "b", "a", "maxvio")])
    out = table_stats.statistics(table, results)
    diff = out["differences"]["b"]["val_loss"]
    assert diff["seeds"] == [0, 2] and diff["values"] == pytest.approx([-0.2, -0.1])
    assert out["differences"]["b"]["maxvio"]["n"] == 0
    first, second, third = out["claims"]
    assert first["values"] == pytest.approx([-0.2, -0.1]) and first["n"] == 2
    half = stats.t.ppf(0.975, 1) * np.std([-0.2, -0.1], ddof=1) / math.sqrt(2)
    assert [first["low"], first["high"]] == pytest.approx([-0.15 - half, -0.15 + half])
    assert first["verdict"] == "not resolved"  # t_{0.975, 1} = 12.7: [-0.79, 0.49]
    assert second["values"] == pytest.approx([0.2, 0.1])
    assert third["n"] == 0 and third["verdict"] == "not resolved"
    assert "no seed where both rows finished" in report.claim_line(third)


def _toy_results(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A tables dir with the toy table and a second table, and a results dir with only the toy table's JSON (two
    seeds, b - a = -0.3 and -0.5 in val_loss, 0 and 0 in maxvio)."""
    tables_dir, results = tmp_path / "tables", tmp_path / "results"
    tables_dir.mkdir()
    results.mkdir()
    (tables_dir / "toy.py").write_text(TOY_TABLE)
    (tables_dir / "other.py").write_text(TOY_TABLE.replace('TITLE = "toy table"', 'TITLE = "other table"'))
    table = tables.load_table("toy", tables_dir)
    rows = []
    for row, losses in (("a", (2.0, 2.2)), ("b", (1.7, 1.7))):
        overrides = next(r.overrides for r in table.ROWS if r.name == row)
        runs = [{"seed": seed, "workdir": f"runs/{row}/seed{seed}", "steps": 4, "batch_size": 8, "seq_len": 32,
                 "tokens": 1024, "metrics": {"val_loss": loss, "maxvio": 0.5}, "corpus": {"name": "stdlib"}}
                for seed, loss in enumerate(losses)]
        rows.append({"name": row, "config": CONFIG, "overrides": overrides, "paper": {}, "note": "", "runs": runs,
                     "seeds_finished": 2, "mean": {}, "std": {}})
    payload = {"table": "toy", "budget": "full", "budget_overrides": table.BUDGET, "seeds": 2, "rows": rows}
    (results / "toy.json").write_text(json.dumps(payload))
    (results / "toy.md").write_text("# toy\n")
    return tables_dir, results


def test_readme_block_rewrite_is_idempotent_and_only_touches_the_block(tmp_path):
    tables_dir, results = _toy_results(tmp_path)
    readme = tmp_path / "README.md"
    before, after = "# Project\n\nText before.\n\n### Results\n\n", "\n\n## Next section\n\nText after.\n"
    readme.write_text(before + summary.BEGIN + "\nold, hand-written text\n" + summary.END + after)
    assert summary.write_summary(readme, results, tables_dir) is True
    text = readme.read_text()
    assert text.startswith(before + summary.BEGIN) and text.endswith(summary.END + after)
    assert "hand-written" not in text
    assert summary.write_summary(readme, results, tables_dir) is False  # idempotent
    assert readme.read_text() == text
    block = text[text.index(summary.BEGIN):text.index(summary.END)]
    # b - a = -0.3, -0.5: mean -0.4, sd 0.141421, half width 12.706205 * 0.141421 / sqrt(2) = 1.270620
    # p = 2 * P(T_1 > 0.4 / (0.141421 / sqrt(2)) = 4) = 0.1560; Holm over the 2 claims: not resolved
    assert ("| b beats a | **not resolved** | 0.1560 | **not resolved** | `val_loss` b − a = -0.4000 | "
            "[-1.6706, 0.8706] | 2 |") in block
    assert ("| b balances better | **not resolved** | 1.0000 | **not resolved** | `maxvio` b − a = 0.0000 | "
            "[0.0000, 0.0000] | 2 |") in block
    assert ("**[toy](results/toy.md)** (toy table): 2 of 2 seed(s) per row finished; tokens per run: 4 steps × 8 × "
            "32 = 1,024 tokens;") in block.replace("\n", " ")
    assert "older definition" not in block


def test_summary_of_a_table_without_results_says_so(tmp_path):
    tables_dir, results = _toy_results(tmp_path)
    block = summary.summary_block(results, tables_dir, tmp_path)
    other = block[block.index("**`other`**"):].replace("\n", " ")
    assert other.startswith("**`other`**: other table. **No results yet**: `python -m experiments.reproduce other` "
                            "writes them (3 seeds).")
    assert "**[toy](results/toy.md)**" in block


def test_readme_without_markers_is_refused(tmp_path, capsys):
    tables_dir, results = _toy_results(tmp_path)
    readme = tmp_path / "README.md"
    for text in ("no markers\n", f"{summary.END}\n{summary.BEGIN}\n",
                 f"{summary.BEGIN}{summary.BEGIN}{summary.END}"):
        readme.write_text(text)
        with pytest.raises(runner.UsageError, match="exactly one"):
            summary.write_summary(readme, results, tables_dir)
        assert readme.read_text() == text
    code, _, err = run_main(reproduce, ["toy", "--summary", "--tables-dir", str(tables_dir)], capsys)
    assert code == 2 and "--summary takes no table" in err


def test_older_results_say_what_differs(tmp_path):
    tables_dir, results = _toy_results(tmp_path)
    payload = json.loads((results / "toy.json").read_text())
    payload["rows"][0]["overrides"] = {k: v for k, v in payload["rows"][0]["overrides"].items()
                                       if k != "model.moe.top_k"}
    table = tables.load_table("toy", tables_dir)
    changes = provenance.definition_changes(table, payload)
    assert changes == [{"field": "model.moe.top_k", "then": 2, "now": 1, "then_text":
                        "not set (today's config default: `2`)", "now_text": "`1`", "rows": ["a"]}]
    text = provenance.changes_text(table, payload)
    assert text.startswith("**Measured under an older definition of this table** (4 steps per run).")
    assert "`model.moe.top_k` not set (today's config default: `2`) then, `1` now (rows a)" in text
    # the README's line names each differing field once, however many rows differ in it in different ways
    payload["rows"][1]["overrides"] = {**payload["rows"][1]["overrides"], "model.moe.top_k": 3}
    (results / "toy.json").write_text(json.dumps(payload))
    assert len(provenance.definition_changes(table, payload)) == 2
    block = summary.summary_block(results, tables_dir, tmp_path).replace("\n", " ")
    assert "(overrides differing: `model.moe.top_k`; see its page)" in block


@pytest.mark.parametrize("name", tables.available_tables(tables.TABLES_DIR))  # every table in experiments/tables
def test_tables_train_on_bpe_and_declare_claims(name, tmp_path):

    table = tables.load_table(name)  # checks the claims' rows, metrics and directions
    assert table.CLAIMS and table.BUDGET == tables.TABLE_BUDGET  # every table runs at the budget the pilot chose
    for budget in reproduce.BUDGETS:
        for row, runs in reproduce.runs_by_row(table, table.ROWS, 1, tmp_path, budget).items():
            assert runs[0].overrides["data.tokenizer"] == "bpe:8192", (row, budget)
            assert runs[0].overrides["model.vocab_size"] == 8192, (row, budget)
    if name == "deepseekmoe_table1":  # the hash row hashes every one of the 8,192 BPE ids, about evenly
        from moejax.moe import routers
        hash_row = next(row for row in table.ROWS if row.name == "hash")
        config = runner.load_config(hash_row.config)
        experts = np.asarray(routers.hash_experts(np.arange(8192), config.model.moe.num_experts,
                                                  config.model.moe.router.hash_seed))
        counts = np.bincount(experts, minlength=config.model.moe.num_experts)
        assert counts.min() > 0.9 * 8192 / len(counts) and counts.max() < 1.1 * 8192 / len(counts)


@pytest.mark.parametrize("name", ["deepseekmoe_table1", "deepseekmoe_fig3"])
def test_deepseekmoe_tables_match_parameters(name):
    """DeepSeekMoE's comparison (arXiv 2401.06066, section 4.1): at every row, the experts of a layer hold the
    parameters of 16 standard FFNs, and a token activates 2 of them (1 for the top-1 rows Hash and Switch; the dense
    row is one FFN), read from each row's resolved config; every row shares the tables' width."""

    table = tables.load_table(name)
    default_tokenizer = runner.load_config("configs/dense.py").data.tokenizer
    widths = set()
    runs = reproduce.runs_by_row(table, table.ROWS, 1, pathlib.Path("unused"), "full")
    for row in (row.name for row in table.ROWS):
        config = runner.load_config(next(r.config for r in table.ROWS if r.name == row))
        config.update_from_flattened_dict(runs[row][0].overrides)
        model, moe = config.model, config.model.moe
        widths.add((model.d_model, model.ffn_dim, model.num_layers))
        one_ffn = 3 * model.d_model * model.ffn_dim  # a SwiGLU: gate, up and down
        if model.moe_every == 0:
            assert row == "dense"
            continue
        expert = 3 * model.d_model * moe.expert_ffn
        total = (moe.num_shared + moe.num_experts) * expert
        activated = (moe.num_shared + moe.top_k) * expert
        assert total == 16 * one_ffn, (row, total / one_ffn)
        assert activated == (1 if row in ("hash", "switch") else 2) * one_ffn, (row, activated / one_ffn)
    assert widths == {(64, tables.FFN, 4)}
    assert runner.load_config("configs/dense.py").data.tokenizer == default_tokenizer  # each call is a fresh copy


def test_bad_claims_are_refused(tmp_path, capsys):
    for claim, words in (('Claim("x", "b", "c")', ["'c' is not a row"]),
                         ('Claim("x", "b", "a", "val_los")', ["unknown metric 'val_los'"]),
                         ('Claim("x", "b", "a", better="smaller")', ["better='smaller'", "lower, higher"])):
        (tmp_path / "bad.py").write_text(TOY_TABLE.replace('Claim("b beats a", "b", "a")', claim))
        code, _, err = run_main(reproduce, ["bad", "--tables-dir", str(tmp_path), "--dry-run"], capsys)
        assert code == 2, err
        for word in words:
            assert word in err


def test_committed_results_show_the_verdicts():
    """The committed pages carry one verdict line per claim of their table, as their JSON's seeds give them, and
    README.md's block is what --summary writes."""
    for name in ("deepseekmoe_table1", "deepseekmoe_fig3"):
        table = tables.load_table(name)
        payload = json.loads((summary.RESULTS_DIR / f"{name}.json").read_text())
        md = (summary.RESULTS_DIR / f"{name}.md").read_text()
        for claim in table_stats.statistics(table, payload)["claims"]:
            assert f"* {report.claim_line(claim)}" in md
    readme = summary.README.read_text()
    block = readme[readme.index(summary.BEGIN):readme.index(summary.END) + len(summary.END)]
    assert block == summary.summary_block()


def test_posthoc_common_cache_json_pages_and_draws(tmp_path, capsys):
    """experiments/posthoc_common.py: strict JSON (numpy to Python, NaN to None), a result cache a new instance
    reads back, a page written from its JSON and rewritten from it alone (findings kept), the random expert draws,
    the number format and the progress lines."""
    from experiments import posthoc_common as common

    value = {"a": np.float32(0.5), "b": np.arange(3), "c": (1, float("nan")), "d": {"e": float("inf")}}
    assert common.jsonable(value) == {"a": 0.5, "b": [0, 1, 2], "c": [1, None], "d": {"e": None}}
    cache = common.ResultCache(tmp_path / "run" / "study")
    assert cache.put("x", {"v": np.float64(1.25)})["v"] == 1.25
    cache.section("results")["k"] = 3
    cache.save()
    assert common.ResultCache(tmp_path / "run" / "study").data == {"x": {"v": 1.25}, "results": {"k": 3}}
    assert not list((tmp_path / "run" / "study").glob("*.tmp"))

    def render(payload, findings):
        return f"# {payload['title']}\n{runner.FINDINGS_BEGIN}{findings}{runner.FINDINGS_END}\n{payload['n']:.2f}\n"

    page = common.write_page(tmp_path / "out", "study", {"title": "t", "n": np.float32(2)}, render, "(none yet)")
    assert page.read_text() == f"# t\n{runner.FINDINGS_BEGIN}\n## Findings\n\n(none yet)\n{runner.FINDINGS_END}\n2.00\n"
    page.write_text(page.read_text().replace("(none yet)", "hand-written"))
    common.rerender(tmp_path / "out", "study", render, "(none yet)")
    assert "hand-written" in page.read_text() and json.loads((tmp_path / "out" / "study.json").read_text())["n"] == 2

    exclude = {(0, 1), (2, 3)}
    draws = [common.random_experts(np.random.default_rng(seed), [0, 2], 4, 3, exclude) for seed in range(20)]
    for drawn in draws:
        assert drawn == sorted(drawn) and len(set(drawn)) == 3 and not set(drawn) & exclude
        assert all(layer in (0, 2) and 0 <= e < 4 for layer, e in drawn)
    assert len({tuple(d) for d in draws}) > 1
    assert common.random_experts(np.random.default_rng(7), [0, 2], 4, 3, exclude) == draws[7]

    assert [common.fixed(v, 2) for v in (None, float("nan"), 1.234, 3)] == ["–", "nan", "1.23", "3.00"]
    assert common.fixed(None, 4, "—") == "—"
    common.speaker("study")("hello")
    assert re.fullmatch(r"\[study +\d+\.\ds\] hello\n", capsys.readouterr().out)


def random_moe_run(path, data_dir):
    """A workdir at path holding a random 2-layer model of 8 experts (top-2, one shared expert, batches of 2 x 16
    tokens of the stdlib corpus in data_dir): (path, config, params, moe_state)."""
    import jax
    import jax.numpy as jnp
    from moejax.configs import base

    from moejax import model
    from moejax.training import checkpoint

    config = base.get_config()
    config.data.update(dir=str(data_dir), eval_batches=1)
    config.train.update(batch_size=2, seq_len=16)
    config.model.update(d_model=16, num_layers=2, num_heads=2, ffn_dim=32, init_std=0.3)
    config.model.moe.update(num_experts=8, top_k=2, expert_ffn=8, num_shared=1, dispatch="dropless")
    model.validate(config.model)
    shapes = jax.eval_shape(model.Transformer(config.model).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    rng = np.random.default_rng(0)  # random weights without compiling the init
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), shapes["params"])
    moe_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes.get("moe_state", {}))
    return checkpoint.save_variables(path, config, {"params": params, "moe_state": moe_state}), config, params, \
        moe_state


def test_posthoc_compression_runs_resumes_and_writes_the_page(tmp_path, data_dir, capsys):
    """experiments/posthoc_compression.py on a random 2-layer model of 8 experts (one calibration batch of 2 x 16
    tokens, one seed, frequency pruning to 4 experts; the super-expert ablation skipped, its two helpers checked on
    the variables): a progress line per result, the page, JSON and plot written, a rerun that computes nothing."""
    from experiments import posthoc_compression, posthoc_super_experts

    run, config, params, moe_state = random_moe_run(tmp_path / "run", data_dir)
    args = [f"--checkpoint={run}", "--seeds=1", "--calib_batches=1", "--fractions=0.5", "--methods=frequency",
            "--no_super", "--compile_cache=none", f"--out={tmp_path / 'results'}"]
    code, out, err = run_main(posthoc_compression, args, capsys)
    assert code == 0, err
    assert re.search(r"\[1/1\] frequency kept 4/8 seed 0: [\d.]+ bits/byte \(compress", out), out
    results = json.loads((run / "posthoc_compression" / "results.json").read_text())["results"]
    assert math.isfinite(results["frequency/4/0"]["bits_per_byte"]) and "baseline" in results
    page = (tmp_path / "results" / "posthoc_compression.md").read_text()
    assert f"{results['frequency/4/0']['bits_per_byte']:.4f}" in page and "No cell is missing." in page
    assert (tmp_path / "results" / "posthoc_compression.png").stat().st_size > 0
    code, out, err = run_main(posthoc_compression, args, capsys)
    assert code == 0, err
    assert "1/1 results cached" in out and not re.search(r"\d bits/byte", out), out
    page = (tmp_path / "results" / "posthoc_compression.md").read_text()  # the rerun's page: its own wall time
    (tmp_path / "results" / "posthoc_compression.md").write_text("stale")
    code, out, err = run_main(posthoc_compression, ["--render_only", f"--out={tmp_path / 'results'}"], capsys)
    assert code == 0, err
    assert (tmp_path / "results" / "posthoc_compression.md").read_text() == page  # the page from its JSON alone

    variables = {"params": params, "moe_state": moe_state}
    zeroed = posthoc_super_experts.zero_experts(config, variables, [(1, 3)])
    for layer in (0, 1):
        before = np.asarray(variables["params"][f"layers_{layer}"]["ffn"]["experts"]["wo"])
        after = np.asarray(zeroed["params"][f"layers_{layer}"]["ffn"]["experts"]["wo"])
        expected = before.copy()
        if layer == 1:
            expected[3] = 0
            assert np.abs(before[3]).max() > 0
        np.testing.assert_array_equal(after, expected)
    draws = posthoc_super_experts.random_sets([(1, 3), (1, 5)], {(1, 3), (1, 5), (0, 0)}, [0, 1], 8, 4, False)
    same = posthoc_super_experts.random_sets([(1, 3), (1, 5)], {(1, 3), (1, 5)}, [0, 1], 8, 4, True)
    assert len(draws) == len(same) == 4
    for drawn in draws + same:
        assert len(set(drawn)) == 2 and not set(drawn) & {(1, 3), (1, 5), (0, 0)}
    assert all(layer == 1 for drawn in same for layer, _ in drawn)


def test_posthoc_routing_runs_resumes_and_rerenders(tmp_path, data_dir, capsys):
    """experiments/posthoc_routing.py on the random model of random_moe_run (4,096 tokens traced, 512 evaluated, one
    random draw per control, beta 0 alone, the imported release skipped): every step, the page and its JSON; the
    evaluator's bits per byte equal to those of its per-position losses; a rerun that computes nothing;
    --render_only rewrites the same page from the JSON alone."""
    from experiments import posthoc_routing

    run, *_ = random_moe_run(tmp_path / "run", data_dir)
    args = [f"--checkpoint={run}", "--max_tokens=4096", "--eval_tokens=512", "--keywords=self,def", "--random_draws=1",
            "--betas=0", "--max_new=4", "--no_release", f"--out={tmp_path / 'results'}"]
    posthoc_routing.main(args)
    out = capsys.readouterr().out
    assert "silencing baseline:" in out and "SCMoE sweep" in out and "greedy samples at beta 0.0" in out, out
    payload = json.loads((tmp_path / "results" / "posthoc_routing.json").read_text())
    base = payload["silencing"]["baseline"]
    assert base["bits_per_byte"] == pytest.approx(base["bits_per_byte_pass2"], rel=1e-5)
    assert payload["info"]["eval_tokens"] == 512 and payload["info"]["trace_tokens"] == 4096
    assert payload["summary"]["silencing_table"], payload["keywords"]  # a keyword occurs in the trace
    page = (tmp_path / "results" / "posthoc_routing.md").read_text()
    assert f"Model: {base['bits_per_byte']:.4f} bits/byte" in page and "## Self-contrast decoding" in page
    posthoc_routing.main(args)
    assert not re.search(r"silencing \S+: |SCMoE sweep|greedy samples", capsys.readouterr().out)
    page = (tmp_path / "results" / "posthoc_routing.md").read_text()
    (tmp_path / "results" / "posthoc_routing.md").write_text("stale")
    posthoc_routing.main(["--render_only", f"--out={tmp_path / 'results'}"])
    assert (tmp_path / "results" / "posthoc_routing.md").read_text() == page
