"""Released-model helpers shared by the test modules: the transformers golden fixtures (tests/hf/golden/, written by
tests/hf/golden/make_hf_goldens.py), whether the live transformers checks can run, a tiny random Mixtral-layout model
as moejax.hf.save takes it, a released-style tokenizer directory, and flat views of variables."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest
from moejax.configs import base
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moejax import hf

GOLDEN = pathlib.Path(__file__).resolve().parent / "hf" / "golden"
_spec = importlib.util.spec_from_file_location("make_hf_goldens", GOLDEN / "make_hf_goldens.py")
goldens = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(goldens)
CASES = list(goldens.CASES)

# The texts a tokenizer directory is trained on (and the tokenizer tests encode).
TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld ✓ — naïve café\n", "", "class A:\n    pass\n" * 3,
         "</s> is a special token here"]


def has_torch() -> bool:
    """Whether torch and transformers import (the live checks run only then)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def golden_dir(case: str) -> pathlib.Path:
    """The golden fixture directory of a case (config.json, model.safetensors, golden.npz); skips the test when it
    has not been written."""
    directory = goldens.ROOT / case
    if not (directory / "golden.npz").is_file():
        pytest.skip(f"no fixture for {case}: run python tests/hf/golden/make_hf_goldens.py {case}")
    return directory


def random_mixtral(vocab_size: int, num_layers: int = 1, seed: int = 0) -> tuple:
    """(config, {'params'}): a Mixtral-layout model (width 32, 4 heads of which 2 key/value heads, 4 experts of width
    16, top-2, softmax over the top-k logits) with normal(0, 0.3) weights drawn in numpy (an eager init is slower on
    2 cores), ready for moejax.hf.save."""
    config = base.get_config()
    config.model.update(d_model=32, num_layers=num_layers, num_heads=4, num_kv_heads=2, ffn_dim=64,
                        vocab_size=vocab_size)
    config.model.moe.update(num_experts=4, top_k=2, expert_ffn=16)
    config.model.moe.router.softmax_before_topk = False
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda leaf: rng.normal(0, 0.3, leaf.shape).astype(np.float32),
                          hf.abstract_variables(config.model)["params"])
    return config, {"params": params}


def tokenizer_dir(directory: pathlib.Path, eos_files: dict | None = None) -> pathlib.Path:
    """A released-style tokenizer directory: a byte-level BPE of 300 ids with '<pad>' (0) and '</s>' (1), trained
    on TEXTS with the tokenizers package, and tokenizer_config.json naming '</s>' (or eos_files: {file name: JSON})."""
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    for name, content in (eos_files if eos_files is not None else {"tokenizer_config.json":
                                                                   {"eos_token": "</s>"}}).items():
        (directory / name).write_text(json.dumps(content))
    return directory


def flat(variables) -> dict:
    """{'params/.../name': numpy array} of a variables tree."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


def release_with_tokenizer(case: str, target: pathlib.Path, corpus: pathlib.Path) -> pathlib.Path:
    """A copy of a golden fixture (no golden.npz) with a BPE tokenizer trained on the corpus's files, of at most its
    vocabulary (characters outside the alphabet are '<unk>'; eos '</s>', id 1): a release a run can fine-tune."""
    import shutil

    directory = pathlib.Path(shutil.copytree(golden_dir(case), target))
    (directory / "golden.npz").unlink()
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())], trainers.BpeTrainer(
        vocab_size=vocab, limit_alphabet=vocab - 8, special_tokens=["<unk>", "</s>"], show_progress=False))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return directory


def logits_of(config, variables, tokens, mesh=None):
    """The model's logits for tokens [B, S], jitted, as numpy (on ``mesh`` when given)."""
    import jax.numpy as jnp

    from moejax import model

    return np.asarray(jax.jit(model.Transformer(config.model, mesh).apply)(variables, jnp.asarray(tokens, jnp.int32)))


def assert_sharded_load_matches(case: str, atol: float = 1e-5, **mesh_fields: int) -> None:
    """A golden case loaded onto the 8 forced host devices (mesh expert=4 x tensor=2 unless ``mesh_fields`` say
    otherwise) gives the unsharded load's logits (two copies of the golden tokens) within ``atol``."""
    import jax.numpy as jnp

    from moejax import hf, parallel

    directory = golden_dir(case)
    tokens = np.tile(np.load(directory / "golden.npz")["tokens"], (2, 1))
    config, variables = hf.load(directory)
    reference = logits_of(config, variables, tokens)
    config.mesh.update(**(mesh_fields or {"data": 1, "expert": 4, "tensor": 2}))
    mesh = parallel.make_mesh(config)
    config, sharded = hf.load(directory, mesh=mesh)
    batch = jax.device_put(jnp.asarray(tokens, jnp.int32), parallel.batch_sharding(mesh))
    np.testing.assert_allclose(logits_of(config, sharded, batch, mesh), reference, atol=atol, rtol=0)
