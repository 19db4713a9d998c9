"""moejax: Mixture-of-Experts language models in JAX/Flax, from one CPU to a TPU pod."""
from setuptools import setup

setup(
    name="moejax",
    version="0.1.0",
    description="Mixture-of-Experts research codebase in JAX/Flax",
    python_requires=">=3.11",
    packages=["moejax", "moejax.adapters", "moejax.data", "moejax.hf", "moejax.hf.families", "moejax.moe",
              "moejax.posthoc", "moejax.training", "moejax.kernels", "moejax.quant", "moejax.configs"],
    package_dir={"moejax": "moejax", "moejax.configs": "configs"},
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "absl-py",
        "clu",
        "grain",
        "array_record",
        "tensorflow-datasets",
        "tensorboardX",
        "matplotlib",
        "safetensors",
        "scipy",
        "ml_dtypes",
        "tokenizers",  # data.tokenizer 'hf:' and 'bpe:' (moejax/data/tokenizers.py); needs no torch
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
        "tf": ["tensorflow"],
        "notebooks": ["nbclient", "nbformat", "ipykernel"],
        # tests/hf/golden/make_hf_goldens.py, make_quant_goldens.py (accelerate: transformers' FP8 loader),
        # tests/adapters/golden/make_peft_goldens.py and the live transformers / PEFT checks
        "hf": ["torch", "transformers", "accelerate", "peft"],
    },
)
