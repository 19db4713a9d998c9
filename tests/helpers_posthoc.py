"""The post-hoc tests' small random model: a Transformer config and variables drawn in numpy over the shapes of its
init (nothing compiled), with every bias non-zero so that pruning, merging and capture see them."""
import jax
import jax.numpy as jnp
import numpy as np
from moejax.configs import base

from moejax import model, moe

VOCAB = 64


def random_model(num_layers=2, first_dense=0, moe_every=1, scan=False, seed=0, router=None, remat=False,
                 param_dtype="float32", **moe_fields):
    """(config, variables) of a small random model: width 16, 8 experts of width 8, top-2, router biases on; the
    model fields given, then the model.moe fields. Weights normal(0, 0.3), norm scales uniform in [0.5, 1.5), router
    and expert biases normal(0, 0.5), the selection bias (moe_state router_bias) uniform in [0, 0.1)."""
    config = base.get_config()
    m = config.model
    m.update(vocab_size=VOCAB, d_model=16, num_layers=num_layers, num_heads=2, ffn_dim=32,
             first_dense_layers=first_dense, moe_every=moe_every, scan_layers=scan, remat=remat, init_std=0.3,
             param_dtype=param_dtype)
    m.moe.update(num_experts=8, top_k=2, expert_ffn=8, dispatch="dropless")
    m.moe.router.update(bias=True, **(router or {}))
    m.moe.update(moe_fields)
    model.validate(m)
    shapes = jax.eval_shape(model.Transformer(m).init, jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def randomise(path, x):
        names = [str(getattr(key, "key", None)) for key in path]
        if moe.ROUTER_BIAS in names:
            return jnp.asarray(rng.uniform(0.0, 0.1, x.shape), x.dtype)
        if names[-1] == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        std = 0.5 if names[-1] == "bias" or (moe.EXPERTS in names and names[-1].startswith("b")) else 0.3
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    variables = jax.tree_util.tree_map_with_path(randomise, {"params": shapes["params"],
                                                             "moe_state": shapes["moe_state"]})
    return config, variables
