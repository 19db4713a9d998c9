"""moejax.hf's LongCat-Flash family (arXiv 2509.01322) and the model features it brought: the shortcut-connected MoE
layout (model.moe_shortcut), MLA's LoRA-rank scalings (model.mla.lora_scaling) and identity experts
(model.moe.num_identity_experts).

The golden cases (tests/hf/golden/cases_longcat_flash.py) are checked by tests/hf/test_hf.py against transformers'
own forward pass: logits within 1e-4, greedy tokens, export then import (the checkpoint layer's two sublayers and
the selection bias over routed + identity experts written back under the released names). Here: decoding with the
KV cache gives the goldens' greedy tokens; the scanned layers give the unrolled logits; one sharded load on 8 forced
host devices gives the unsharded logits; the config mapping both ways, its refusals and the model fields' checks;
the released preset against its config.json and published size.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checks, generate, hf, model, parallel
from moejax.hf import io
from moejax.moe import intervention as iv_lib
from moejax.posthoc import capture
from tests.helpers_configs import load
from tests.helpers_hf import golden_dir

CASE = "longcat_flash_a"  # two checkpoint layers (four moejax layers), 8 routed + 4 identity experts


def logits_of(config, variables, tokens, mesh=None):
    return np.asarray(jax.jit(model.Transformer(config.model, mesh).apply)(variables, jnp.asarray(tokens, jnp.int32)))


def raw_config(case=CASE) -> dict:
    return json.loads((golden_dir(case) / "config.json").read_text())


def test_cached_decoding_gives_the_golden_greedy_tokens():
    """longcat_flash_b: the latent KV cache of the scaled MLA with YaRN, the shortcut MoE over identity experts."""
    directory = golden_dir("longcat_flash_b")
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    prompt = golden["prompt"]
    got = generate.generate(config, variables, prompt, max_new_tokens=golden["greedy"].shape[1])
    np.testing.assert_array_equal(got[:, prompt.shape[1]:], golden["greedy"])


def test_scanned_layers_give_the_golden_logits():
    """model.scan_layers: each scanned unit is a (shortcut MoE layer, dense layer) pair, the MoE's output carried
    from block_0 to block_1; the unrolled variables stacked per unit."""
    directory = golden_dir(CASE)
    golden = np.load(directory / "golden.npz")
    config, variables = hf.load(directory)
    units = config.model.num_layers // 2
    scanned = {}
    for collection, tree in variables.items():
        layers = {k: v for k, v in tree.items() if k.startswith("layers_")}
        blocks = {f"block_{j}": jax.tree.map(lambda *xs: np.stack(xs), *[layers[f"layers_{2 * u + j}"]
                                                                         for u in range(units)])
                  for j in range(2) if f"layers_{j}" in layers}
        scanned[collection] = {**{k: v for k, v in tree.items() if k not in layers}, "blocks": blocks}
    config.model.scan_layers = True
    model.validate(config.model)
    np.testing.assert_allclose(logits_of(config, scanned, golden["tokens"]), golden["logits"], atol=1e-4, rtol=0)


def test_sharded_load_gives_the_golden_logits():
    """Mesh expert=4 x tensor=2: the routed experts under shard_map, the identity slots skipped by the dispatch and
    added by every device for its own tokens (the unsharded load's logits are tests/hf/test_hf.py's)."""
    directory = golden_dir(CASE)
    golden = np.load(directory / "golden.npz")
    config = hf.read_config(directory)
    config.mesh.update(data=1, expert=4, tensor=2)
    mesh = parallel.make_mesh(config)
    config, sharded = hf.load(directory, mesh=mesh)
    tokens = np.tile(golden["tokens"], (4, 1))  # the batch splits over data x expert = 4
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), parallel.batch_sharding(mesh))
    np.testing.assert_allclose(logits_of(config, sharded, batch, mesh), np.tile(golden["logits"], (4, 1, 1)),
                               atol=1e-4, rtol=0)


def test_mtp_weights_are_skipped_with_a_note(tmp_path, capsys):
    """The released checkpoint keeps its multi-token-prediction module under model.mtp.*, which transformers'
    LongCat-Flash skips on load: so does moejax, naming them."""
    target = tmp_path / CASE
    shutil.copytree(golden_dir(CASE), target)
    ckpt = io.Checkpoint(target)
    tensors = {key: np.array(ckpt.array(key)) for key in ckpt.keys()}
    del ckpt
    tensors["model.mtp.layers.0.eh_proj.weight"] = np.zeros((32, 64), np.float32)
    (target / io.SINGLE_FILE).unlink()
    io.write_checkpoint(target, [(k, v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()],
                        hf.MAX_SHARD_BYTES)
    _, variables = hf.load(target)
    assert "skipped 1 checkpoint tensors transformers' longcat_flash skips too (model.mtp.layers.0.eh_proj.weight" \
        in capsys.readouterr().err
    assert "mtp_1" not in variables["params"]


def test_config_mapping_both_ways():
    raw = raw_config()
    m = hf.families.config_from_hf(raw)[0].model
    assert (m.num_layers, m.moe_every, m.first_dense_layers, m.moe_shortcut) == (4, 2, 0, True)
    assert model.moe_layers(m) == [0, 2] and m.attention == "mla" and m.rope_interleave and m.mla.lora_scaling
    assert (m.mla.q_lora_rank, m.mla.kv_lora_rank, m.ffn_dim, m.rope_theta) == (16, 8, 48, 500.0)
    assert (m.moe.num_experts, m.moe.num_identity_experts, m.moe.top_k, m.moe.expert_ffn) == (8, 4, 3, 16)
    r = m.moe.router
    assert (r.kind, r.score, r.softmax_before_topk, r.norm_topk_prob, r.routed_scaling_factor) == \
        ("topk", "softmax", True, False, 2.0)
    out = hf.families.config_to_hf(m, "longcat_flash")
    for field in ("num_layers", "n_routed_experts", "zero_expert_num", "moe_topk", "q_lora_rank", "kv_lora_rank",
                  "head_dim", "qk_head_dim", "ffn_hidden_size", "expert_ffn_hidden_size", "routed_scaling_factor"):
        assert out[field] == raw[field], field
    assert "num_hidden_layers" not in out  # transformers derives it as 2 * num_layers
    assert hf.families.config_to_hf(m)["model_type"] == "longcat_flash"  # the only family that expresses it


@pytest.mark.parametrize("change,match", [
    ({"router_bias": True}, "router_bias=True.*computes the logits without it"),
    ({"zero_expert_num": 0}, "zero_expert_num=0"),
    ({"head_dim": 8}, "head_dim=8.*must be equal"),
    ({"qk_head_dim": 16}, "qk_head_dim=16"),
    ({"num_hidden_layers": 3}, "num_hidden_layers=3.*2 \\* num_layers = 4"),
    ({"num_key_value_heads": 2}, "num_key_value_heads=2"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"q_lora_rank": None}, "lacks the field 'q_lora_rank'"),
])
def test_refusals_name_the_field(change, match):
    with pytest.raises(hf.HFConfigError, match=match):
        hf.families.config_from_hf({**raw_config(), **change})


def test_the_other_families_refuse_its_features():
    m = hf.families.config_from_hf(raw_config())[0].model
    with pytest.raises(hf.HFConfigError, match="model.moe_shortcut=True cannot be saved as deepseek_v3"):
        hf.families.config_to_hf(m, "deepseek_v3")
    m.moe_shortcut, m.moe_every = False, 1
    with pytest.raises(hf.HFConfigError, match="model.mla.lora_scaling=True cannot be saved as deepseek_v3"):
        hf.families.config_to_hf(m, "deepseek_v3")
    m.mla.lora_scaling = False
    with pytest.raises(hf.HFConfigError, match="model.moe.num_identity_experts=4 cannot be saved as deepseek_v3"):
        hf.families.config_to_hf(m, "deepseek_v3")


def test_the_model_fields_are_checked():
    m = hf.families.config_from_hf(raw_config())[0].model

    def refused(match, **fields):
        bad = m.copy_and_resolve_references()
        for field, value in fields.items():
            section = bad
            *path, name = field.split("__")
            for part in path:
                section = section[part]
            section[name] = value
        with pytest.raises(checks.ConfigError, match=match):
            model.validate(bad)

    refused("model.moe_shortcut=True.*MoE layer 0's output joins after layer 1, which must be a dense layer",
            moe_every=1)
    refused("MoE layer 4's output joins after layer 5", num_layers=5)
    refused("model.mla.lora_scaling.*q_lora_rank > 0", mla__q_lora_rank=0)
    refused("model.moe.num_identity_experts=4 is invalid: identity experts need a model.moe.router.kind",
            moe__router__kind="adamoe")
    refused("model.moe.router.num_groups=2", moe__router__num_groups=2)
    refused("model.mtp_depth=1", mtp_depth=1)
    # routing interventions do not reach the identity experts, and post-hoc capture has no stream after a shortcut
    # MoE layer: both refused by name
    config, variables = hf.load(golden_dir(CASE))
    with pytest.raises(NotImplementedError, match="model.moe_shortcut=True"):
        capture.check_supported(config)
    with pytest.raises(checks.ConfigError, match="model.moe.num_identity_experts=4"):
        jax.eval_shape(lambda: model.Transformer(config.model).apply(
            variables, jnp.zeros((1, 4), jnp.int32), intervention=iv_lib.mask_experts(config.model, {0: [1]})))


# transformers' LongcatFlashConfig defaults (its docstring names meituan-longcat/LongCat-Flash-Chat) as save_pretrained
# writes them, in bfloat16 (configs/longcat_flash.py)
LONGCAT_FLASH_CHAT = {
    "architectures": ["LongcatFlashForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "expert_ffn_hidden_size": 2048, "ffn_hidden_size": 12288, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02, "kv_lora_rank": 512,
    "max_position_embeddings": 131072, "model_type": "longcat_flash", "moe_topk": 12, "n_routed_experts": 512,
    "num_attention_heads": 64, "num_key_value_heads": 64, "num_layers": 28, "output_router_logits": False,
    "pad_token_id": None, "q_lora_rank": 1536, "qk_head_dim": 192, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 10000000.0, "rope_type": "default"},
    "routed_scaling_factor": 6.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 131072, "zero_expert_num": 256,
}


def test_released_preset_equals_read_config_and_the_published_size(tmp_path):
    """560.7B parameters (published: 560B); 31.4B activated without the input embedding when all 12 slots are routed
    experts (published: 18.6B to 31.3B, as tokens pick identity experts)."""
    got = load("longcat_flash", "flash").model
    (tmp_path / "config.json").write_text(json.dumps(LONGCAT_FLASH_CHAT))
    assert got.to_dict() == hf.read_config(tmp_path).model.to_dict()
    model.validate(got)
    cfg = got.copy_and_resolve_references()
    cfg.scan_layers = True
    shapes = jax.eval_shape(lambda: model.Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    n = model.param_counts(shapes["params"], cfg)
    assert abs(n["total"] - 560e9) < 1e9 and abs(n["activated"] - got.vocab_size * got.d_model - 31.3e9) < 0.5e9, n


def test_small_default_is_a_model_of_the_family():
    assert hf.families.config_to_hf(load("longcat_flash").model, "longcat_flash")["model_type"] == "longcat_flash"
