"""Steering through experts (moejax/posthoc/steer.py): the chosen experts are the top-nPMI (layer, expert) pairs of
a numpy count over a random trace; the modes build the right interventions; ``python -m moejax.posthoc steer``
reports the model evaluated with and without the intervention, equal to evaluating it directly."""
import json

import numpy as np
import pytest

import moejax
from moejax import data, evaluate
from moejax.moe import intervention
from moejax.posthoc import __main__ as cli
from moejax.posthoc import steer
from moejax.posthoc.trace import Trace
from tests import reference as ref

pytestmark = pytest.mark.xdist_group("posthoc_commands")


def random_trace(seed=0, tokens=400, experts=6, k=2, vocab=12):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocab, tokens)
    chosen = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]) for _ in range(3)])
    chosen[:, token_ids == 5, 0] = np.array([1, 4, 2])[:, None]  # marker 5 prefers one expert per layer
    return Trace(experts=chosen.astype(np.int32), weights=np.full(chosen.shape, 0.5, np.float32),
                 token_ids=token_ids.astype(np.int32), layers=np.array([1, 2, 3]), num_experts=experts)


def test_marker_experts_are_the_top_npmi_pairs():
    trace = random_trace()
    expected = np.stack([ref.npmi(trace.experts[layer], trace.token_ids, 6)[:, 5] for layer in range(3)])
    chosen = steer.marker_experts(trace, [5], n=2, events="slot")  # the slot option; the token default: test_fidelity
    np.testing.assert_allclose(chosen.npmi, expected, atol=1e-12)
    best = sorted(np.argsort(-expected.ravel(), kind="stable")[:2].tolist())
    assert sorted((layer, e) for layer, ids in chosen.experts.items() for e in ids) == \
        sorted((int(trace.layers[i // 6]), i % 6) for i in best)
    per_layer = steer.marker_experts(trace, [5], n=1, per_layer=True, events="slot")
    assert per_layer.experts == {1: [1], 2: [4], 3: [2]}
    with pytest.raises(ValueError, match="never occur"):
        steer.marker_experts(trace, [99])


def test_modes_build_the_interventions():
    from moejax.configs import base

    cfg = base.get_config().model
    cfg.update(num_layers=3, first_dense_layers=1)
    cfg.moe.update(num_experts=6, top_k=2)
    masked = steer.intervention_for(cfg, {1: [2], 2: [0, 5]}, "silence")
    expected = np.zeros((3, 6), bool)
    expected[1, 2] = expected[2, 0] = expected[2, 5] = True
    np.testing.assert_array_equal(np.asarray(masked.mask), expected)
    scaled = steer.intervention_for(cfg, {2: [3]}, "reinforce", 3.0)
    want = np.ones((3, 6), np.float32)
    want[2, 3] = 3.0
    np.testing.assert_array_equal(np.asarray(scaled.scale), want)
    with pytest.raises(ValueError, match="scale"):
        steer.intervention_for(cfg, {2: [3]}, "reinforce", 0.5)
    with pytest.raises(ValueError, match="mode"):
        steer.intervention_for(cfg, {2: [3]}, "amplify")


@pytest.mark.parametrize("mode,scale", [("silence", 2.0)])  # reinforce builds its record in test_modes_...
def test_steer_cli_evaluates_with_and_without(release, tmp_path, mode, scale):
    directory, flags = release
    out = tmp_path / "steer.json"
    result = cli.main(["steer", *flags, "--marker=(", "--experts=top2-npmi", f"--mode={mode}", f"--scale={scale}",
                       "--out", str(out)])
    assert json.loads(out.read_text())["chosen"] == result["chosen"]
    chosen = {int(k): v for k, v in result["chosen"]["experts"].items()}
    assert sum(len(v) for v in chosen.values()) == 2 and result["marker_ids"] == [ord("(")]
    config, variables = moejax.load(directory)
    config.data.update(name=flags[flags.index("--data") + 1], dir=flags[flags.index("--data_dir") + 1],
                       eval_batches=2)
    config.train.update(batch_size=4, seq_len=32)
    batches = data.eval_batches(config)
    iv = (intervention.mask_experts(config.model, chosen) if mode == "silence" else
          intervention.scale_experts(config.model, {layer: {e: scale for e in ids} for layer, ids in chosen.items()}))
    assert result["steered"]["loss"] == pytest.approx(evaluate.evaluate(config, variables, batches,
                                                                        intervention=iv)["loss"], abs=1e-6)
    assert result["baseline"]["loss"] == pytest.approx(evaluate.evaluate(config, variables, batches)["loss"],
                                                       abs=1e-6)
    assert result["steered"]["loss"] != result["baseline"]["loss"]
    assert result["marker_probability"]["steered"] != result["marker_probability"]["baseline"]


def test_bad_steer_flags_are_named(release, tmp_path):
    _, flags = release
    with pytest.raises(ValueError, match="--experts"):
        cli.main(["steer", *flags, "--marker=(", "--experts=best2", "--out", str(tmp_path / "s.json")])
