"""Multi-token prediction (DeepSeek-V3 section 2.2; moejax/model.py MTPModule, objectives.mtp_cross_entropy).

References: the depth-1 logits recomposed by hand from the model's parameters (numpy norms, projection, shift and
shared head; the block through its own module), the loss against a numpy loop over positions, and a run of
``python -m moejax.main`` that logs the loss per depth."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import model
from moejax.training import objectives


def tiny(depth=2, scan=False):
    config = base.get_config()
    config.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, ffn_dim=64, mtp_depth=depth,
                        scan_layers=scan)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=16)
    module = model.Transformer(config.model)
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    return config, module, {k: v for k, v in variables.items() if k in ("params", "moe_state")}


def rms(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(scale)


def test_scanned_models_predict_every_depth_too():
    config, module, variables = tiny(depth=2, scan=True)
    tokens = jnp.zeros((2, 8), jnp.int32)
    _, aux = module.apply(variables, tokens, train=True, mutable=["moe_aux", model.MTP_COLLECTION])
    assert [x.shape for x in aux[model.MTP_COLLECTION]["logits"]] == [(2, 8, 64)] * 2
    assert model.MTP_COLLECTION not in module.apply(variables, tokens, mutable=[model.MTP_COLLECTION])[1]  # eval


def test_depth_one_logits_are_the_papers_composition():
    scan = False
    config, module, variables = tiny(depth=2, scan=scan)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    logits, aux = module.apply(variables, tokens, train=True, mutable=["moe_aux", model.MTP_COLLECTION])
    mtp = aux[model.MTP_COLLECTION]["logits"]
    assert len(mtp) == 2 and mtp[0].shape == logits.shape
    params = variables["params"]
    eps = config.model.norm_eps
    p = params["mtp_1"]
    hidden = np.asarray(_last_block_output(module, variables, tokens, scan), np.float64)  # h^0
    shifted = np.pad(np.asarray(tokens)[:, 1:], ((0, 0), (0, 1)))
    embedded = np.asarray(params["embed"]["embedding"], np.float64)[shifted]
    joined = np.concatenate([rms(embedded, p["enorm"]["scale"], eps), rms(hidden, p["hnorm"]["scale"], eps)], -1)
    projected = joined @ np.asarray(p["eh_proj"]["kernel"], np.float64)
    block = model.Block(config.model, use_moe=True)
    out, _ = block.apply({"params": p["block"], "moe_state": variables["moe_state"]["mtp_1"]["block"]},
                         jnp.asarray(projected, jnp.float32), True, jnp.asarray(shifted), None,
                         config.model.num_layers, mutable=["moe_aux"])
    normed = rms(out, p["norm"]["scale"], eps)
    want = normed @ np.asarray(params["lm_head"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(mtp[0]), want, rtol=2e-4, atol=2e-4)


def _last_block_output(module, variables, tokens, scan):
    """The last block's output (the final norm's input), captured from the model (train mode, as above)."""
    name = "blocks" if scan else "layers_1"
    _, state = module.apply(variables, tokens, train=True, capture_intermediates=lambda mdl, _: mdl.name == name,
                            mutable=["intermediates", "moe_aux", model.MTP_COLLECTION])
    out = state["intermediates"][name]["__call__"][0]
    return out[0][0] if scan else out


def test_the_loss_per_depth_is_a_numpy_loop_and_the_objective_adds_it():
    rng = np.random.default_rng(2)
    logits, targets = rng.normal(size=(2, 6, 5)), rng.integers(0, 5, (2, 6))
    for depth in (1, 3):
        total, count = 0.0, 0
        for b in range(2):
            for i in range(6 - depth):
                row = logits[b, i] - logits[b, i].max()
                total -= row[targets[b, i + depth]] - np.log(np.exp(row).sum())
                count += 1
        got = objectives.mtp_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), depth)
        assert float(got) == pytest.approx(total / count, rel=1e-5)
    config, module, variables = tiny(depth=2)
    batch = jnp.asarray(rng.integers(0, 64, (2, 9)), jnp.int32)
    value, report = objectives.from_config(config, module, jax.random.key(0))(
        variables["params"], variables["moe_state"], batch, jnp.int32(0))
    plain_config = config.copy_and_resolve_references()
    plain_config.model.mtp_depth = 0
    plain, plain_report = objectives.from_config(plain_config, model.Transformer(plain_config.model),
                                                 jax.random.key(0))(
        {k: v for k, v in variables["params"].items() if not k.startswith("mtp_")}, variables["moe_state"], batch,
        jnp.int32(0))
    assert report.mtp_loss.shape == (2,) and float(report.loss) == pytest.approx(float(plain_report.loss), rel=1e-6)
    # the MTP block's router losses join the others
    assert float(value) == pytest.approx(float(plain) - float(plain_report.aux_loss) + float(report.aux_loss)
                                         + 0.3 * float(report.mtp_loss.mean()), rel=1e-5, abs=1e-5)


def test_the_training_loop_trains_with_mtp_and_logs_each_depth(stdlib_corpus, tmp_path, capsys):
    from moejax.training import loop
    from tests import helpers_configs

    config = helpers_configs.tiny(stdlib_corpus.parent / "cache", {
        "data.name": f"text:{stdlib_corpus}/*.py", "model.mtp_depth": 2, "train.steps": 2,
        "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 0, "checkpoint.every_steps": 2})
    workdir = tmp_path / "run"
    loop.run(config, workdir)
    out = capsys.readouterr().out
    assert " | mtp_1 " in out and " | mtp_2 " in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train and all(np.isfinite(r["mtp_loss_1"]) and np.isfinite(r["mtp_loss_2"]) for r in train)
