"""LoRA from the command line: ``python -m moejax.main --config.model.lora.targets=...`` fine-tunes a base model
(init_from='run:<dir>') with its base weights frozen, and ``python -m moejax.posthoc merge-adapter`` writes the merged
model (the adapted model's logits) and the adapters in PEFT's format."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import cli, model
from moejax.adapters import lora, peft
from moejax.posthoc import __main__ as posthoc
from moejax.training import checkpoint
from tests import helpers_configs, helpers_env
from tests.helpers_configs import REPO

TARGETS = "('attn/(q|v)/kernel', 'experts/wi_', 'router/kernel')"


def test_fine_tune_then_merge_and_export(data_dir, tmp_path):
    config = helpers_configs.tiny(data_dir, {"model.num_layers": 1, "model.moe.router.norm_topk_prob": True})  # Mixtral
    tokens = jnp.zeros((1, 8), jnp.int32)
    base = jax.jit(model.Transformer(config.model).init)(jax.random.key(3), tokens)
    checkpoint.save_variables(tmp_path / "base", config, {"params": base["params"], "moe_state": base["moe_state"]})
    args = [sys.executable, "-m", "moejax.main", f"--config={REPO / 'tests' / 'helpers_train.py'}",
            f"--config.data.dir={data_dir}", f"--config.init_from=run:{tmp_path / 'base'}",
            f"--config.model.lora.targets={TARGETS}", "--config.model.lora.rank=4", "--config.train.steps=4",
            "--config.train.warmup_steps=0", "--config.train.eval_every=4", "--config.train.log_every=2",
            "--config.checkpoint.every_steps=4", "--config.data.eval_batches=1", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(args, cwd=REPO, env=dict(helpers_env.single_device_env(tmp_path / "cache")),
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    run_config, variables = moejax.load(tmp_path / "run")
    assert tuple(run_config.model.lora.targets) == eval(TARGETS)
    trained_base, adapters = lora.split(variables["params"])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(trained_base), jax.tree.leaves(base["params"]),
                                 strict=True):
        assert np.array_equal(np.asarray(got), np.asarray(want)), jax.tree_util.keystr(path)  # frozen
    assert np.any(np.asarray(adapters["layers_0"]["ffn"]["experts"]["wi_0_lora_b"]))  # trained

    out, peft_dir = tmp_path / "merged", tmp_path / "peft"
    posthoc.main(["merge-adapter", f"--checkpoint={tmp_path / 'run'}", f"--out={out}", f"--peft={peft_dir}"])
    merged_config, merged = moejax.load(out)
    assert lora.spec(merged_config.model) is None and not lora.split(merged["params"])[1]
    batch = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
    want = jax.jit(model.Transformer(run_config.model).apply)(variables, batch)
    got = jax.jit(model.Transformer(merged_config.model).apply)(merged, batch)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (peft_dir / peft.CONFIG_FILE).is_file() and (peft_dir / peft.WEIGHTS_FILE).is_file()
    _, loaded = peft.load(run_config, peft_dir)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(adapters), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)

    with pytest.raises(cli.UsageError, match="--checkpoint=.*without LoRA adapters"):
        posthoc.main(["merge-adapter", f"--checkpoint={tmp_path / 'base'}", f"--out={tmp_path / 'again'}"])
    assert not (tmp_path / "again").exists()
