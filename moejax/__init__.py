"""moejax: Mixture-of-Experts language models in JAX/Flax."""
__version__ = "0.1.0"


def load(path, step=None):
    """(config, variables) of a moejax workdir: its config (config.json over configs/base.py's defaults) and the
    newest checkpoint's (or step's) {'params', 'moe_state'} as jax arrays. See moejax/loading.py."""
    from moejax.loading import load as load_run  # imported here: `import moejax` stays free of jax

    return load_run(path, step)
