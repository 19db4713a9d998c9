"""LoRA adapters in PEFT's format (moejax/adapters/peft.py) on the released families' golden models (tests/hf/golden):
PEFT's key names and layouts (lora_A [r, in], lora_B [out, r]; scaling * B A is the change of the merged
checkpoint tensor), adapter_config.json, save then load giving identical values and logits, and what PEFT cannot
express refused by name; the golden fixtures of tests/adapters/golden (make_peft_goldens.py: adapters written by
moejax, logits and a greedy continuation computed by peft.PeftModel) read back by moejax. The live check
(peft.PeftModel.from_pretrained against moejax's logits) runs where torch, transformers and peft are installed."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import hf, model
from moejax.adapters import lora, merging, peft
from moejax.hf import io, rules
from moejax.hf.families import family
from tests.helpers_hf import golden_dir

MIXTRAL = ("attn/(q|k|v|o)/kernel", "router/kernel", "experts/(wi_0|wi_1|wo)", "lm_head")


def adapted(case, targets, seed=0, **lora_fields):
    """(config, variables) of a golden case with adapters on targets, A and B drawn from N(0, 0.2^2) in numpy."""
    config, variables = hf.load(golden_dir(case))
    config.model.lora.update(targets=tuple(targets), rank=4, alpha=8.0, **lora_fields)
    model.validate(config.model)
    rng = np.random.default_rng(seed)
    shapes = lora.split(hf.abstract_variables(config.model)["params"])[1]
    adapters = jax.tree.map(lambda leaf: rng.normal(0, 0.2, leaf.shape).astype(np.float32), shapes)
    params = jax.tree.map(np.asarray, variables["params"])
    return config, {**variables, "params": lora.join(params, adapters)}


def same_tree(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b, strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def test_mixtral_keys_layouts_and_config(tmp_path):
    """Mixtral: PEFT's keys for attention, router, each expert's w1/w3/w2 and the head; scaling * lora_B @ lora_A is
    what merging adds to each checkpoint tensor; adapter_config.json names the modules, r, alpha, rslora."""
    config, variables = adapted("mixtral_a", MIXTRAL, rslora=True)
    out = peft.save(config, variables, tmp_path, base_model="mixtral_a")
    raw = json.loads((out / peft.CONFIG_FILE).read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8.0 and raw["use_rslora"] is True
    assert raw["init_lora_weights"] is True and raw["base_model_name_or_path"] == "mixtral_a"
    assert {"model.layers.0.self_attn.o_proj", "model.layers.0.block_sparse_moe.gate", "lm_head",
            "model.layers.0.block_sparse_moe.experts.3.w2"} <= set(raw["target_modules"])
    tensors = io.SafetensorsFile(out / peft.WEIGHTS_FILE)
    scaling = 8.0 / np.sqrt(4)
    merged_config, merged = merging.merge(config, variables)
    base = hf.load(golden_dir("mixtral_a"))[1]["params"]
    fam = family("mixtral")
    checked = 0
    for keys, rule in (((("layers_0", "attn", "o", "kernel"), None), fam.layer_rules["attn/o/kernel"]),
                       ((("layers_1", "ffn", "experts", "wi_1"), 2), fam.layer_rules["ffn/experts/wi_1"]),
                       ((("lm_head", "kernel"), None), rules.TOP_RULES["lm_head/kernel"])):
        (path, expert), i = keys, int(keys[0][0][len("layers_"):]) if keys[0][0].startswith("layers_") else None
        module = rule.hf.format(i=i, j=expert)[: -len(".weight")]
        a = np.asarray(tensors.array(f"base_model.model.{module}.lora_A.weight"))
        b = np.asarray(tensors.array(f"base_model.model.{module}.lora_B.weight"))
        new, old = merged["params"], base
        for key in path:
            new, old = new[key], old[key]
        new, old = (np.asarray(w) if expert is None else np.asarray(w)[expert] for w in (new, old))
        change = rules.to_hf(rule.kind, [new]) - rules.to_hf(rule.kind, [old])
        assert a.shape[0] == 4 and b.shape[1] == 4 and change.shape == (b.shape[0], a.shape[1])
        np.testing.assert_allclose(scaling * b @ a, change, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == 3


@pytest.mark.parametrize("case,targets,fields", [
    ("mixtral_a", MIXTRAL, {}),
    ("qwen2_moe_a", ("attn/(q|v)/kernel", "shared/", "shared_gate", "experts/wi_0"), {"experts": "shared"}),
    ("deepseek_v2_a", ("attn/(q|kv_a|kv_b|o)/kernel", "ffn/(wi_0|wo)", "shared/wi_1", "experts/wo"), {}),
], ids=["mixtral", "qwen2_moe_shared_experts", "deepseek_v2_mla"])
def test_save_then_load_gives_the_same_adapters_and_logits(case, targets, fields, tmp_path):
    config, variables = adapted(case, targets, **fields)
    peft.save(config, variables, tmp_path)
    loaded_config, adapters = peft.load(config, tmp_path)
    same_tree(adapters, lora.split(variables["params"])[1])
    assert tuple(loaded_config.model.lora.targets) == tuple(targets)
    assert loaded_config.model.lora.experts == config.model.lora.experts
    base_config, _ = hf.load(golden_dir(case))  # no lora section set: the rules come from the file
    fresh_config, fresh = peft.load(base_config, tmp_path)
    model.validate(fresh_config.model)
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % config.model.vocab_size
    want = jax.jit(model.Transformer(config.model).apply)(variables, tokens)
    got = jax.jit(model.Transformer(fresh_config.model).apply)(
        {**variables, "params": lora.join(lora.split(variables["params"])[0], fresh)}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,targets,match", [
    ("deepseek_v2_a", ("router/kernel",), "mlp.gate.weight as a bare parameter"),
    ("gpt_oss_a", ("experts/wi_0",), "not one nn.Linear weight"),
    ("mixtral_a", (), "no adapters"),
])
def test_what_peft_cannot_express_is_refused_by_name(case, targets, match, tmp_path):
    if targets:
        config, variables = adapted(case, targets)
    else:
        config, variables = hf.load(golden_dir(case))
    with pytest.raises(peft.AdapterError, match=match):
        peft.save(config, variables, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_scanned_layers_and_foreign_files_are_refused(tmp_path):
    config, variables = adapted("mixtral_a", ("attn/q/kernel",))
    scanned = config.copy_and_resolve_references()
    scanned.model.scan_layers = True
    with pytest.raises(peft.AdapterError, match="scan_layers"):
        peft.save(scanned, variables, tmp_path / "scanned")
    peft.save(config, variables, tmp_path / "ok")
    raw = json.loads((tmp_path / "ok" / peft.CONFIG_FILE).read_text())
    (tmp_path / "ok" / peft.CONFIG_FILE).write_text(json.dumps({**raw, "use_dora": True}))
    with pytest.raises(peft.AdapterError, match="use_dora=True has no moejax equivalent"):
        peft.load(config, tmp_path / "ok")
    (tmp_path / "ok" / peft.CONFIG_FILE).write_text(json.dumps(raw))
    wider, _ = hf.load(golden_dir("mixtral_b"))  # other widths
    with pytest.raises(peft.AdapterError, match=r"q_proj.lora_B.weight has shape \[32, 4\], expected \[48, 4\]"):
        peft.load(wider, tmp_path / "ok")
    qwen, qwen_variables = adapted("qwen3_moe_a", ("experts/wi_0",))
    peft.save(qwen, qwen_variables, tmp_path / "qwen")
    with pytest.raises(peft.AdapterError, match="experts.0.gate_proj.lora_A.weight is not a LoRA weight of a module"):
        peft.load(config, tmp_path / "qwen")  # Mixtral's experts are w1/w3/w2


def test_live_peft_gives_moejax_logits(tmp_path):
    """peft.PeftModel.from_pretrained(the base model moejax.hf.save wrote, the adapter moejax wrote) computes
    moejax's logits. The routed experts and the router are adapted where transformers keeps them as nn.Linear
    modules (transformers 4); from transformers 5 on, the attention projections and the head."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft_lib = pytest.importorskip("peft")
    targets = ("attn/(q|k|v|o)/kernel", "lm_head")
    if int(transformers.__version__.split(".")[0]) < 5:
        targets = MIXTRAL
    config, variables = adapted("mixtral_a", targets)
    base_config = config.copy_and_resolve_references()
    base_config.model.lora.targets = ()
    hf.save(base_config, {**variables, "params": lora.split(variables["params"])[0]}, tmp_path / "base")
    peft.save(config, variables, tmp_path / "adapter")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapted_model = peft_lib.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    tokens = np.arange(16, dtype=np.int64).reshape(2, 8) % config.model.vocab_size
    with torch.no_grad():
        theirs = adapted_model(torch.tensor(tokens)).logits.float().numpy()
    ours = np.asarray(model.Transformer(config.model).apply(variables, tokens.astype(np.int32)))
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)


PEFT_GOLDENS = pathlib.Path(__file__).resolve().parent / "golden"


def greedy(config, variables, prompt, steps):
    """Greedy continuation by the full forward pass on a fixed buffer (the model is causal)."""
    apply = jax.jit(model.Transformer(config.model).apply)
    width = prompt.shape[1]
    ids = np.zeros((prompt.shape[0], width + steps), np.int32)
    ids[:, :width] = prompt
    for t in range(width, width + steps):
        ids[:, t] = np.asarray(apply(variables, jnp.asarray(ids)))[:, t - 1].argmax(-1)
    return ids[:, width:]


@pytest.mark.parametrize("case,base", [("peft_mixtral", "mixtral_a"), ("peft_llama", "llama_a")])
def test_peft_golden_logits_and_greedy(case, base):
    """moejax reads the adapter directory (written by moejax, run by peft.PeftModel on the transformers base golden
    in make_peft_goldens.py) onto the base golden: PEFT's logits within 1e-4, the same greedy continuation. Mixtral:
    adapters on attention, the router and every routed expert's w1, w3, w2 (PEFT on transformers 5 runs them on the
    router's bare gate.weight and the fused expert parameters gate_up_proj and down_proj)."""
    directory = PEFT_GOLDENS / case
    if not (directory / "golden.npz").is_file():
        pytest.skip(f"no fixture for {case}: run tests/adapters/golden/make_peft_goldens.py")
    golden = np.load(directory / "golden.npz")
    base_config, variables = hf.load(golden_dir(base))
    config, adapters = peft.load(base_config, directory)
    model.validate(config.model)
    variables = {**variables, "params": lora.join(jax.tree.map(np.asarray, variables["params"]), adapters)}
    logits = np.asarray(jax.jit(model.Transformer(config.model).apply)(variables, golden["tokens"].astype(np.int32)))
    base_logits = np.asarray(jax.jit(model.Transformer(base_config.model).apply)(
        {**variables, "params": lora.split(variables["params"])[0]}, golden["tokens"].astype(np.int32)))
    assert np.abs(base_logits - golden["logits"]).max() > 1e-2  # the adapters change the logits
    np.testing.assert_allclose(logits, golden["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(greedy(config, variables, golden["prompt"], golden["greedy"].shape[1]),
                                  golden["greedy"])
    if case == "peft_mixtral":
        assert config.model.lora.experts == "per_expert"
        assert list(golden["target_parameters"]) == ["down_proj", "gate.weight", "gate_up_proj"]
