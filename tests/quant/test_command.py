"""python -m moejax.posthoc quantise: the model, its compact form and the metrics it writes, and flags named before
anything loads."""
import json

import jax
import numpy as np
import pytest

import moejax
from moejax import cli as moejax_cli
from moejax.posthoc import __main__ as cli
from moejax.quant import transform

TEXT = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    def __init__(self):\n        self.items = []\n"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(checkpoint dir, data flags): a 2-layer Mixtral-layout model (4 experts, top-2, bytes) and a text corpus read
    in one batch of 4 x 32 tokens."""
    from moejax import hf
    from tests import helpers_hf

    root = tmp_path_factory.mktemp("quantise_release")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.py").write_text(TEXT.replace("add", f"add_{i}") * (6 + i))
    config, variables = helpers_hf.random_mixtral(vocab_size=256, num_layers=2)
    directory = hf.save(config, variables, root / "release")
    flags = ["--checkpoint", str(directory), "--data", f"text:{corpus}/*.py", "--data_dir", str(root / "data"),
             "--batch_size", "4", "--seq_len", "32", "--max_tokens", "128"]
    return directory, flags


def test_gptq_with_mixed_bits_writes_the_model_its_compact_form_and_metrics(release, tmp_path):
    out = tmp_path / "quantised"
    result = cli.main(["quantise", *release[1], "--method=gptq", "--rules=experts=int4/g8;attention=fp8/8x8",
                       "--mixed_bits=2,4,8", "--budget=4", "--min_tokens=40", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "posthoc.json",
                                                     "quantise_metrics.json", "quantised.safetensors"]
    assert json.loads((out / "quantise_metrics.json").read_text()) == json.loads(json.dumps(result))
    what = json.loads((out / "posthoc.json").read_text())
    assert what["operation"] == "quantise" and what["method"] == "gptq" and what["tensors"] == "quantised.safetensors"
    bits = np.array([what["mixed"]["expert_bits"][layer] for layer in ("0", "1")])
    assert bits.mean() <= 4 and set(bits.ravel()) <= {2, 4, 8}
    for layer, info in what["gptq"]["layers"].items():
        assert sum(info["tokens"]) == 128 * 2 and info["rtn_experts"] == [e for e, n in enumerate(info["tokens"])
                                                                           if n < 40], layer
    metrics = result["metrics"]
    assert set(metrics) == {"bytes", "weights", "routing", "evaluation"}
    assert len(metrics["routing"]["flips"]) == 2 and all(0 <= f <= 1 for f in metrics["routing"]["flips"])
    assert metrics["bytes"]["quantised"] < metrics["bytes"]["original"]
    assert np.isfinite(metrics["evaluation"]["delta_bits_per_byte"])
    # the saved weights are exactly the compact form dequantised onto the original model
    _, original = moejax.load(release[0])
    _, saved = moejax.load(out)
    rebuilt = transform.materialise(original["params"], transform.load_tensors(out / "quantised.safetensors"))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), saved["params"],
                                     rebuilt))
    assert not np.array_equal(np.asarray(saved["params"]["layers_0"]["ffn"]["experts"]["wi_0"]),
                              np.asarray(original["params"]["layers_0"]["ffn"]["experts"]["wi_0"]))


@pytest.mark.parametrize("flags,match", [
    (["--method=awq"], r"--method='awq': allowed are rtn, gptq"),
    (["--bits=9"], r"--bits=9: int bits in 2..8"),
    (["--targets=experts,mlp"], r"--targets='experts,mlp': comma-separated among attention, experts"),
    (["--rules=experts=int4;router=fp4"], r"--rules=.*rules\[1\].format='fp4' is not a weight format"),
    (["--budget=3"], r"--budget=3.0: needs --mixed_bits"),
    (["--mixed_bits=2,4", "--budget=1"], r"--budget=1.0: with --mixed_bits"),
    (["--mixed_bits=1,4", "--budget=3"], r"--mixed_bits='1,4'"),
    (["--mixed_bits=2,4", "--budget=3", "--criterion=size"], r"--criterion='size'"),
    (["--min_tokens=0"], r"--min_tokens=0"),
    (["--rules=experts=int4@9"], r"--rules=.*matches no quantisable matrix"),
    (["--hf_quantisation=fp8"], r"--hf_quantisation='fp8': needs --format=hf"),
    (["--format=hf", "--hf_quantisation=int4"], r"--hf_quantisation='int4': allowed are fp8"),
    (["--format=hf", "--hf_quantisation=mxfp4"], r"--hf_quantisation='mxfp4': .*for the gpt_oss family only")])
def test_bad_flags_are_named(release, tmp_path, flags, match):
    with pytest.raises(moejax_cli.UsageError, match=match):
        cli.main(["quantise", *release[1], *flags, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_hf_export_writes_fp8_blocks(release, tmp_path):
    """--format=hf --hf_quantisation=fp8/16x16: a DeepSeek-V3-style FP8 checkpoint of the quantised model."""
    from moejax import hf
    from moejax.hf import io

    out = tmp_path / "fp8"
    cli.main(["quantise", *release[1], "--bits=8", "--targets=experts", "--format=hf",
              "--hf_quantisation=fp8/16x16", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]
    ckpt = io.Checkpoint(out)
    assert str(ckpt.dtype("model.layers.1.block_sparse_moe.experts.3.w1.weight")) == "float8_e4m3fn"
    _, saved = hf.load(out)
    _, original = moejax.load(release[0])
    a = np.asarray(saved["params"]["layers_1"]["ffn"]["experts"]["wi_0"])
    b = np.asarray(original["params"]["layers_1"]["ffn"]["experts"]["wi_0"])
    assert 0 < np.abs(a - b).max() < 0.1 * np.abs(b).max()


def test_gptq_and_routing_metrics_on_an_expert_parallel_mesh_equal_one_device(release, tmp_path):
    """--mesh=data=2,expert=4 on the suite's 8 forced host devices: the GPTQ calibration passes and the routing
    metrics run expert-parallel (the experts split over 'expert'); the codes, scales and metrics equal one
    device's."""
    assert jax.device_count() == 8, "tests/conftest.py forces 8 host devices"
    flags = [*release[1], "--batch_size", "8", "--max_tokens", "256", "--method=gptq", "--bits=4", "--group_size=8",
             "--targets=experts", "--min_tokens=8"]
    one = cli.main(["quantise", *flags, "--out", str(tmp_path / "one")])
    mesh = cli.main(["quantise", *flags, "--mesh=data=2,expert=4", "--out", str(tmp_path / "mesh")])
    a = transform.load_tensors(tmp_path / "one" / "quantised.safetensors")
    b = transform.load_tensors(tmp_path / "mesh" / "quantised.safetensors")
    assert a.keys() == b.keys() and len(a) == 6
    codes = same = 0
    for name in a:
        (pa,), (pb,) = a[name].parts, b[name].parts
        np.testing.assert_allclose(pb.arrays["scales"], pa.arrays["scales"], rtol=1e-5, err_msg=name)
        codes += pa.arrays["packed"].size
        same += int((pa.arrays["packed"] == pb.arrays["packed"]).sum())
    assert same / codes >= 0.999, same / codes  # float rounding of the Hessians may move a code on a boundary
    ra, rb = one["metrics"]["routing"], mesh["metrics"]["routing"]
    assert ra["tokens"] == rb["tokens"] == 256
    np.testing.assert_allclose(rb["flips"], ra["flips"], atol=1 / 256)
    np.testing.assert_allclose(rb["kl"], ra["kl"], rtol=1e-3, atol=1e-7)
    assert one["gptq"]["layers"] == mesh["gptq"]["layers"]  # tokens per expert: the same routing
    with pytest.raises(moejax_cli.UsageError, match=r"--mesh='data=3,expert=4': the axis sizes multiply to 12"):
        cli.main(["quantise", *flags, "--mesh=data=3,expert=4", "--out", str(tmp_path / "bad")])


def test_compact_workdir_stores_codes_and_reloads_the_same_model(release, tmp_path):
    """--compact: the checkpoint holds int8 / packed int4 codes and scales (and the float slices no rule quantised);
    moejax.load gives exactly the fake-quantised params of the ordinary workdir, in less disk; quant.decode.load
    keeps the int codes for decoding, with the same tokens."""
    from moejax import generate
    from moejax.quant import compact, decode
    from moejax.training import checkpoint

    rules = "--rules=experts=int4/g8@1;attention=int8"  # layer 0's experts kept: stored as float slices
    cli.main(["quantise", *release[1], rules, "--out", str(tmp_path / "plain")])
    result = cli.main(["quantise", *release[1], rules, "--compact", "--out", str(tmp_path / "compact")])
    assert (tmp_path / "compact" / compact.LAYOUT_FILE).is_file()
    assert not (tmp_path / "compact" / "quantised.safetensors").exists()
    state, _ = checkpoint.load_checkpoint(tmp_path / "compact")
    stored = state["params"]["layers_1"]["ffn"]["experts"]["wi_0"]
    assert stored["part0"]["packed"].dtype == np.uint8 and stored["part0"]["packed"].size == 4 * 32 * 16 // 2
    assert state["params"]["layers_0"]["attn"]["q"]["kernel"]["part0"]["codes"].dtype == np.int8
    config, plain = moejax.load(tmp_path / "plain")
    _, loaded = moejax.load(tmp_path / "compact")
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), plain["params"],
                                     loaded["params"]))
    # the arrays stored: the compact form's bytes the metrics count (codes, scales and the rest as stored)
    stored_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state["params"]))
    assert stored_bytes == result["metrics"]["bytes"]["quantised"] < 0.8 * result["metrics"]["bytes"]["original"]
    _, held = decode.load(tmp_path / "compact")
    assert isinstance(held["params"]["layers_1"]["ffn"]["experts"]["wo"], decode.QuantisedWeight)
    prompts = np.arange(1, 7, dtype=np.int32).reshape(1, 6)
    np.testing.assert_array_equal(generate.generate(config, held, prompts, max_new_tokens=5),
                                  generate.generate(config, plain, prompts, max_new_tokens=5))
    with pytest.raises(moejax_cli.UsageError, match=r"--compact=True: stores a moejax workdir"):
        cli.main(["quantise", *release[1], "--compact", "--format=hf", "--out", str(tmp_path / "bad")])
