"""experiments/quantisation_study.py at a tiny budget: every PTQ method and setting, QAT and its control run on a
2-step model, the claims are paired over seeds with Holm, a rerun resumes from the cache and the page rerenders from
its JSON."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import quantisation_study as study

# One worker runs the module, so that its tests share one run of the module fixture (split over the two pytest-xdist
# workers, each would run the whole tiny study).
pytestmark = pytest.mark.xdist_group("quantisation_study")

TINY = "calib_tokens=64,eval_batches=1,qat_steps=1,qat_batch=8,qwen3_seeds=0,methods=rtn+eaquant,settings=int4+mixed"


@pytest.fixture(scope="module")
def tiny_run(stdlib_corpus, tmp_path_factory):
    from moejax.training import loop
    from tests import helpers_configs

    root = tmp_path_factory.mktemp("quantisation_study")
    config = helpers_configs.tiny(stdlib_corpus.parent / "cache", {
        "data.name": f"text:{stdlib_corpus}/*.py", "train.steps": 2, "train.warmup_steps": 1, "train.batch_size": 8,
        "train.seq_len": 16, "train.log_every": 2, "train.eval_every": 0, "checkpoint.every_steps": 2,
        "data.eval_batches": 1})
    config.model.moe.num_experts = 4
    loop.run(config, root / "seed0")
    out = root / "results"
    payload = study.main(["--checkpoints", str(root / "seed0"), "--budget", TINY, "--out", str(out)])
    return root, out, payload


def test_every_method_setting_and_qat_ran(tiny_run):
    root, out, payload = tiny_run
    results = payload["families"]["deepseekmoe"][0]["results"]
    expected = {"original", "rtn/ternary", "control/fp", "control_rtn/int4", "control_rtn/ternary", "qat/int4",
                "qat/ternary"} | {f"{m}/{s}" for m in ("rtn", "eaquant") for s in ("int4", "mixed")}
    assert set(results) == expected
    assert all(np.isfinite(r["bpb"]) and 0 <= r["flips"] <= 1 for r in results.values())
    assert results["rtn/mixed"]["bits_per_weight"] <= results["rtn/int4"]["bits_per_weight"] + 1e-9
    assert results["qat/int4"]["bpb"] != results["control_rtn/int4"]["bpb"]
    assert (out / "quantisation.png").exists() and json.loads((out / "quantisation.json").read_text())
    page = (out / "quantisation.md").read_text()
    assert "## Claims" in page and "qat/ternary" in page


def test_claims_pair_the_seeds(tiny_run):
    _, _, payload = tiny_run
    one = payload["families"]["deepseekmoe"][0]
    shifted = json.loads(json.dumps(one))
    for record in shifted["results"].values():
        record["bpb"] += 0.5
    shifted["results"]["eaquant/int4"]["bpb"] += 0.25
    decided = study.claims({"families": {"deepseekmoe": [one, shifted, one], "qwen3_moe": []}})
    first = decided[0]  # eaquant/int4 - rtn/int4
    diffs = [one["results"]["eaquant/int4"]["bpb"] - one["results"]["rtn/int4"]["bpb"]] * 3
    diffs[1] += 0.25
    assert first["per_seed"] == pytest.approx(dict(enumerate(diffs)))
    assert first["mean"] == pytest.approx(np.mean(diffs)) and first["n"] == 3
    assert decided[-1]["n"] == 0 and decided[-1]["verdict"] == "not resolved at n=0"


def test_rerun_resumes_and_rerenders(tiny_run, capsys):
    root, out, payload = tiny_run
    again = study.main(["--checkpoints", str(root / "seed0"), "--budget", TINY, "--out", str(out)])
    assert again["families"] == json.loads(json.dumps(payload["families"]))
    assert "done" not in capsys.readouterr().out  # nothing trained or quantised again
    before = (out / "quantisation.md").read_text()
    study.main(["--render_only", "--out", str(out)])
    assert (out / "quantisation.md").read_text() == before
