"""The tiny config of tests/training/test_train.py, also a config file: ``--config=tests/helpers_train.py``."""
import ml_collections
from moejax.configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """d_model 32, 2 MoE layers of 8 experts (top-2, width 32), 8 x 32 tokens per step, 40 steps."""
    del arg
    config = base.get_config()
    m = config.model
    m.d_model, m.num_layers, m.num_heads, m.ffn_dim = 32, 2, 2, 64
    m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn = 8, 2, 32
    m.moe.bias_update_rate = 1e-3
    t = config.train
    t.steps, t.batch_size, t.seq_len = 40, 8, 32
    t.learning_rate, t.warmup_steps = 3e-3, 4
    t.log_every, t.eval_every = 4, 20
    config.data.eval_batches = 2
    config.checkpoint.every_steps, config.checkpoint.keep = 4, 3
    return config
