"""Quantisation-aware training of an imported family: ``python -m moejax.main --config.init_from=hf:<dir>
--config.quant.rules=...`` (the run its main function starts: the config resolved from the release, then the loop)
on the Qwen3-MoE golden fixture trains 2 steps on fake-quantised weights and int8 activations, and the trained
model rounded to nearest under the same rules has exactly the weights the training forward used (the forward is
the same function of them: the activation quantisers are the rules', tests/quant/test_activation.py)."""
import json

import jax
import numpy as np
from moejax.configs import base

import moejax
from moejax import hf
from moejax.quant import qat, rules, transform
from moejax.training import initialise, loop
from tests import helpers_hf

RULES = "experts=int4/g8,a8;attention=int8"


def test_qat_on_an_imported_release_rounds_to_its_training_forward(stdlib_corpus, tmp_path):
    directory = helpers_hf.release_with_tokenizer("qwen3_moe_a", tmp_path / "release", stdlib_corpus)
    config = base.get_config()
    config.init_from = f"hf:{directory}"
    config.data.update(name=f"text:{stdlib_corpus}/*.py", dir=str(stdlib_corpus.parent / "cache"), eval_batches=1)
    config.train.update(steps=2, batch_size=8, seq_len=16, warmup_steps=1, log_every=1, eval_every=0)
    config.checkpoint.every_steps = 2
    config.quant.rules = RULES
    workdir = tmp_path / "run"
    loop.run(initialise.resolve(config), workdir)  # what python -m moejax.main does with these flags
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    trained_config, trained = moejax.load(workdir)
    assert trained_config.quant.rules == RULES and trained_config.model.moe.num_experts == 4
    released = hf.load(directory)[1]["params"]
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(trained["params"]), jax.tree.leaves(released), strict=True))
    # rounded to nearest after training (the posthoc transform) == the weights the training forward used
    rule_list = rules.parse(RULES, activations=True)
    forward = qat.quantize_params(trained_config, trained["params"], rule_list)
    rounded, _ = transform.quantize(trained_config, trained, rule_list)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), forward,
                                     rounded["params"]))
    assert not np.array_equal(np.asarray(forward["layers_0"]["ffn"]["experts"]["wo"]),
                              np.asarray(trained["params"]["layers_0"]["ffn"]["experts"]["wo"]))
