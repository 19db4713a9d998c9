"""experiments/bench_speculative.py in its smoke mode (as tests/experiments/test_benchmarks.py runs the others): the
JSON it prints and writes holds its keys, with finite positive speeds and acceptance rates in [0, 1]."""
import json
import math

import pytest

from experiments import bench_speculative
from tests.experiments.test_benchmarks import assert_positive, printed_json

pytestmark = pytest.mark.xdist_group("benchmarks")


def test_bench_speculative_smoke(capsys, tmp_path):
    result = bench_speculative.main(["--smoke", "--json", str(tmp_path / "speculative.json")])
    assert printed_json(capsys.readouterr().out) == json.loads((tmp_path / "speculative.json").read_text())
    assert set(result) == {"machine", "settings", "training", "rows"}
    assert all(math.isfinite(v) for v in result["training"].values())
    assert [(r["method"], r["gamma"]) for r in result["rows"]] == [("plain", 0), ("draft", 2), ("mtp", 2)]
    for row in result["rows"]:
        assert set(row) == {"method", "gamma", "temperature", "tok_s", "acceptance_rate", "tokens_per_pass",
                            "speedup"}
        assert_positive(row, "tok_s", "tokens_per_pass", "speedup")
        assert row["acceptance_rate"] is None if row["method"] == "plain" else 0 <= row["acceptance_rate"] <= 1
