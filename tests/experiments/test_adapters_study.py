"""experiments/adapters_study.py in seconds: every arm's config is valid on the study's model, and the page, its
claims and its plot come from a synthetic payload (the claims' paired differences against numpy)."""
import json

import numpy as np
import pytest
from scipy import stats

from experiments import adapters_study as study
from moejax import model


@pytest.mark.parametrize("arm", study.ARMS)
def test_every_arm_config_is_valid(arm, tmp_path):
    config = study.run_config(tmp_path / "base", 1, arm, study.BUDGET, "text:/nowhere/*.py")
    model.validate(config.model)
    assert config.init_from == f"run:{tmp_path / 'base'}" and config.seed == 1
    assert config.train.steps == study.BUDGET["steps"]
    assert bool(config.model.lora.targets) == (arm != "full")


def payload():
    rng = np.random.default_rng(0)
    seeds = {}
    for s in study.SEEDS_PREREGISTERED:
        rows = {"base": {"new": 5.1, "old": 5.0}}
        for i, arm in enumerate(study.ARMS):
            rows[arm] = {"new": 4.9 - 0.05 * i + 0.01 * rng.normal(), "old": 5.05 + 0.01 * i + 0.01 * rng.normal()}
        for r in rows.values():
            r.update(trainable=1000, seconds=1.0)
        seeds[str(s)] = rows
    return {"seeds": seeds, "budget": study.BUDGET, "domain": "text:x/*.py", "bases": ["a", "b", "c"],
            "seconds": 3.0, "machine": "test", "command": "python -m experiments.adapters_study"}


def test_page_claims_and_plot(tmp_path):
    p = json.loads(json.dumps(payload()))
    claims = study.claims(p)
    assert len(claims) == len(study.CLAIMS)
    first = claims[0]
    diffs = [p["seeds"][s]["lora_attn"]["new"] - p["seeds"][s]["full"]["new"] for s in p["seeds"]]
    assert first["mean"] == pytest.approx(np.mean(diffs))
    half = stats.t.ppf(0.975, 2) * np.std(diffs, ddof=1) / np.sqrt(3)
    assert first["high"] - first["mean"] == pytest.approx(half)
    page = study.render(p, "findings here")
    for arm in study.ARMS:
        assert study.LABELS[arm] in page
    assert "findings here" in page and "arXiv 2312.09979" in page
    study.plot(p, tmp_path / "adapters.png")
    assert (tmp_path / "adapters.png").stat().st_size > 1000


def test_bad_budget_is_refused():
    with pytest.raises(SystemExit, match="steps_typo"):
        study.parse_budget("steps_typo=3")
    assert study.parse_budget("steps=2")["steps"] == 2
