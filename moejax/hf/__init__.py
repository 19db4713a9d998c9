"""Released MoE checkpoints in the Hugging Face layout (config.json + safetensors), read and written without torch.

    config, variables = moejax.hf.load(path)            # also moejax.load(path) for such a directory
    logits = moejax.model.Transformer(config.model).apply(variables, tokens)
    moejax.hf.save(config, variables, out_dir)          # transformers.AutoModelForCausalLM.from_pretrained(out_dir)

Families (``SUPPORTED``): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3 (its multi-token-prediction
layers are skipped with a note), gpt_oss: one module each in families/ (its config mapping both ways, its tensor
rule table, the fields it ignores), registered in registry.py. Shared beside them: config.py (the config.json
records and the field groups families share), rules.py (the rule kinds and shared rule groups), tensors.py
(parameters <-> checkpoint tensors by a family's rules), io.py (safetensors reading and writing), quant.py (FP8 and
MXFP4 dequantisation), convert.py (``load`` and ``save``).
"""
from moejax.hf import families
from moejax.hf.config import HFConfigError
from moejax.hf.convert import MAX_SHARD_BYTES, abstract_variables, is_hf_dir, load, read_config, save
from moejax.hf.families import SUPPORTED, config_from_hf, config_to_hf
from moejax.hf.io import CheckpointError
from moejax.hf.tensors import Tensors

__all__ = ["load", "save", "is_hf_dir", "read_config", "abstract_variables", "config_from_hf", "config_to_hf",
           "SUPPORTED", "MAX_SHARD_BYTES", "HFConfigError", "CheckpointError", "Tensors", "families"]
