"""Adapters on moejax models: LoRA (``lora.py``: the config's rules, the adapted layers and routed experts),
merging an adapter into its base weights (``merging.py``) and the PEFT format (``peft.py``). See docs/adapters.md.

Nothing is imported here (``moejax.adapters.lora`` sits below the model, ``merging`` and ``peft`` above it); the
functions below load their module when called."""


def merge(config, variables):
    """(config, variables) with every adapter added into its base weight and no adapter left (moejax/adapters/
    merging.py)."""
    from moejax.adapters import merging

    return merging.merge(config, variables)


def save_peft(config, variables, out_dir, **kwargs):
    """Writes adapter_config.json and adapter_model.safetensors (moejax/adapters/peft.py)."""
    from moejax.adapters import peft

    return peft.save(config, variables, out_dir, **kwargs)


def load_peft(config, directory, **kwargs):
    """The adapters of a PEFT adapter directory as moejax parameters (moejax/adapters/peft.py)."""
    from moejax.adapters import peft

    return peft.load(config, directory, **kwargs)
