"""Multi-token-prediction layers of DeepSeek-V3 and GLM-4.5 checkpoints (moejax/hf/mtp.py): the golden fixtures
deepseek_v3_a and glm4_moe_a carry one MTP layer (tests/hf/golden/make_hf_goldens.py ``_mtp_layer``: a decoder block,
enorm, hnorm, eh_proj, shared_head.norm, and the shared_head.head / embed_tokens copies). Loaded into moejax's MTP
module, its logits equal a numpy transcription of vLLM's DeepSeekMultiTokenPredictorLayer / Glm4MoeMultiTokenPredictor
forward (vllm/model_executor/models/deepseek_mtp.py, glm4_moe_mtp.py) on the hub tensors; save -> load is identical
and writes the released names, the copies as copies."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import hf, kv_cache, model, speculative, speculative_mtp
from moejax.hf import io
from tests.helpers_hf import GOLDEN, flat
from tests.hf.test_hf_families2 import attention_np, glm_router_np, glu_np, moe_np, rms_norm, rope_of

TOL = 1e-4
MTP_CASES = ["deepseek_v3_a", "glm4_moe_a"]


@pytest.fixture(scope="module")
def loaded():
    return {case: hf.load(GOLDEN / case) for case in MTP_CASES}


def hub(case: str) -> tuple[dict, dict]:
    raw = json.loads((GOLDEN / case / "config.json").read_text())
    ckpt = io.Checkpoint(GOLDEN / case)
    return raw, {key: np.asarray(ckpt.array(key), np.float64) for key in ckpt.keys()}


def glm_block_np(x, t, i, raw, cos, sin):
    """Glm4MoeDecoderLayer.forward (transformers / vLLM) of layer i: the residual stream after the block."""
    p, eps = f"model.layers.{i}.", raw["rms_norm_eps"]
    h = rms_norm(x, t[p + "input_layernorm.weight"], eps)
    x = x + attention_np(h, t, p, raw, cos, sin, None, raw.get("use_qk_norm", False))
    h = rms_norm(x, t[p + "post_attention_layernorm.weight"], eps)
    if i < raw.get("first_k_dense_replace", 1):
        return x + glu_np(h, t, p + "mlp")
    logits = h.reshape(-1, h.shape[-1]) @ t[p + "mlp.gate.weight"].T
    weights, idx = glm_router_np(logits, t[p + "mlp.gate.e_score_correction_bias"], raw)
    return x + moe_np(h, weights, idx, t, p + "mlp", ("gate_proj", "up_proj", "down_proj")) + \
        glu_np(h, t, p + "mlp.shared_experts")


def glm_mtp_np(raw, t, tokens, mask_first=False):
    """(the main model's last hidden state [B, S, D], the MTP logits [B, S, V]): vLLM's MTP layer at position s reads
    the target's hidden state h_s and the embedding of token s + 1 (the proposer shifts the ids by one), enorm /
    hnorm, eh_proj of the concatenation [enorm(e), hnorm(h)], the decoder block, shared_head.norm, shared_head.head.
    mask_first: vLLM zeroes the embedding at position 0 (``inputs_embeds[positions == 0] = 0``); moejax does not
    (the paper's equation 21, SGLang's deepseek_nextn.py)."""
    layers, eps = raw["num_hidden_layers"], raw["rms_norm_eps"]
    cos, sin = rope_of(raw, raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
                       tokens.shape[1] - 1, phimoe=False)
    x = t["model.embed_tokens.weight"][tokens[:, :-1]]
    for i in range(layers):
        x = glm_block_np(x, t, i, raw, cos, sin)
    p = f"model.layers.{layers}."
    e = t[p + "embed_tokens.weight"][tokens[:, 1:]]
    if mask_first:
        e[:, 0] = 0
    joined = np.concatenate([rms_norm(e, t[p + "enorm.weight"], eps), rms_norm(x, t[p + "hnorm.weight"], eps)], -1)
    y = glm_block_np(joined @ t[p + "eh_proj.weight"].T, t, layers, raw, cos, sin)
    return x, rms_norm(y, t[p + "shared_head.norm.weight"], eps) @ t[p + "shared_head.head.weight"].T


def moejax_mtp(config, variables, tokens):
    """The main model's last hidden state and the MTP module's logits over a whole sequence, as drafting computes
    them (one catch-up pass from slot 0)."""
    cfg = kv_cache.decode_config(config)
    x = jnp.asarray(tokens[:, :-1], jnp.int32)

    @jax.jit
    def run(variables, x, nxt):
        _, mutated = model.Transformer(cfg).apply(variables, x, mutable=[model.HIDDEN_COLLECTION])
        hidden = mutated[model.HIDDEN_COLLECTION]["last"][0]
        cache = kv_cache.Cache(x.shape[1], jnp.asarray(0, jnp.int32), jnp.zeros((x.shape[0],), jnp.int32))
        (logits, _), _ = speculative_mtp.MTPDraft(cfg).apply(speculative_mtp.variables_of(variables), hidden, nxt,
                                                             cache, mutable=[kv_cache.COLLECTION])
        return hidden, logits

    hidden, logits = run(variables, x, jnp.asarray(tokens[:, 1:], jnp.int32))
    return np.asarray(hidden), np.asarray(logits)


def test_mtp_logits_match_vllms_forward(loaded):
    config, variables = loaded["glm4_moe_a"]
    raw, t = hub("glm4_moe_a")
    assert config.model.mtp_depth == 1
    tokens = np.random.RandomState(3).randint(0, raw["vocab_size"], (2, 10))
    hidden, logits = moejax_mtp(config, variables, tokens)
    want_hidden, want = glm_mtp_np(raw, t, tokens)
    assert np.abs(hidden - want_hidden).max() <= TOL
    assert np.abs(logits - want).max() <= TOL, np.abs(logits - want).max()
    # vLLM's zeroed first embedding changes the logits: moejax follows the paper there (docs/inference.md)
    assert np.abs(glm_mtp_np(raw, t, tokens, mask_first=True)[1] - want).max() > 1e-3


@pytest.mark.parametrize("case", MTP_CASES)
def test_save_then_load_is_identical_with_the_released_names(case, loaded, tmp_path):
    config, variables = loaded[case]
    out = hf.save(config, variables, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    raw, t = hub(case)
    saved = io.Checkpoint(out)
    assert set(saved.keys()) == set(t)  # every tensor of the fixture, the MTP layer's included
    for key in saved.keys():
        np.testing.assert_array_equal(np.asarray(saved.array(key), np.float64), t[key], err_msg=key)
    layer = raw["num_hidden_layers"]
    np.testing.assert_array_equal(saved.array(f"model.layers.{layer}.shared_head.head.weight"),
                                  saved.array("lm_head.weight"))
    np.testing.assert_array_equal(saved.array(f"model.layers.{layer}.embed_tokens.weight"),
                                  saved.array("model.embed_tokens.weight"))
    config2, variables2 = hf.load(out)
    assert config2.model.to_dict() == config.model.to_dict()
    a, b = flat(variables), flat(variables2)
    assert a.keys() == b.keys() and any("mtp_1" in str(key) for key in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_a_head_copy_that_differs_is_refused(tmp_path):
    directory = shutil.copytree(GOLDEN / "deepseek_v3_a", tmp_path / "c", ignore=shutil.ignore_patterns("*.npz"))
    ckpt = io.Checkpoint(directory)
    tensors = {key: np.array(ckpt.array(key)) for key in ckpt.keys()}
    del ckpt
    tensors["model.layers.3.shared_head.head.weight"][5, 2] += 1.0
    del tensors["model.layers.3.embed_tokens.weight"]  # an absent copy is fine: the main embedding is read
    (directory / io.SINGLE_FILE).unlink()
    io.write_checkpoint(directory, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                        hf.MAX_SHARD_BYTES)
    with pytest.raises(hf.CheckpointError, match=r"model\.layers\.3\.shared_head\.head\.weight differs from "
                                                 r"lm_head\.weight \(rows from 0\)"):
        hf.load(directory)


def test_a_checkpoint_without_its_mtp_layer_loads_without_it(tmp_path, capsys):
    """transformers saves DeepSeek-V3 / GLM-4.5 without their MTP layers, num_nextn_predict_layers kept."""
    directory = shutil.copytree(GOLDEN / "glm4_moe_a", tmp_path / "c", ignore=shutil.ignore_patterns("*.npz"))
    ckpt = io.Checkpoint(directory)
    tensors = {key: np.array(ckpt.array(key)) for key in ckpt.keys() if not key.startswith("model.layers.3.")}
    del ckpt
    (directory / io.SINGLE_FILE).unlink()
    io.write_checkpoint(directory, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                        hf.MAX_SHARD_BYTES)
    config, variables = hf.load(directory)
    assert config.model.mtp_depth == 0 and "mtp_1" not in variables["params"]
    assert "has no layer 3 for num_nextn_predict_layers=1" in capsys.readouterr().err
    assert hf.read_config(directory).model.mtp_depth == 0  # what init_from='hf:<dir>' builds its model from
    assert hf.read_config(GOLDEN / "glm4_moe_a").model.mtp_depth == 1


def test_other_families_refuse_mtp_modules(loaded, tmp_path):
    config, variables = loaded["deepseek_v3_a"]
    with pytest.raises(hf.HFConfigError, match=r"model\.mtp_depth=1 cannot be saved as deepseek_v2"):
        hf.save(config, variables, tmp_path / "x", model_type="deepseek_v2")


def test_self_speculative_decoding_of_a_loaded_checkpoint_is_greedy(loaded):
    """Multi-head Latent Attention's cache in the MTP block (grouped-query attention: tests/inference)."""
    config, variables = loaded["deepseek_v3_a"]
    prompts = np.random.RandomState(5).randint(0, config.model.vocab_size, (2, 5))
    from moejax import generate

    want = generate.generate(config, variables, prompts, max_new_tokens=9)
    got, stats = speculative.generate_mtp(config, variables, prompts, max_new_tokens=9, gamma=2)
    np.testing.assert_array_equal(got, want)
    assert stats["target_passes"] <= 9


def test_the_mtp_variables_are_the_models():
    """MTPDraft's parameter tree is the model's own embed / mtp_1 / lm_head (nothing else is created)."""
    config, variables = hf.load(GOLDEN / "glm4_moe_a")
    cfg = kv_cache.decode_config(config)
    cache = kv_cache.Cache(4, jnp.asarray(0, jnp.int32), jnp.zeros((1,), jnp.int32))
    shapes = jax.eval_shape(lambda: speculative_mtp.MTPDraft(cfg).init(
        jax.random.key(0), jnp.zeros((1, 4, cfg.d_model)), jnp.zeros((1, 4), jnp.int32), cache))
    mine = jax.tree.map(lambda x: x.shape, speculative_mtp.variables_of(variables)["params"])
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == mine
