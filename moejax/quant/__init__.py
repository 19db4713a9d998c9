"""Quantised MoE models: weight formats (``formats``: int<b> per channel or group, FP8 with block scales, MXFP4),
rules over the parameter paths choosing what is quantised how (``rules``), quantisation as a model transform with its
compact storage form (``transform``), per-expert mixed precision under a bit budget (``mixed``), GPTQ with each
routed expert's own calibration tokens (``gptq``) and the MoE metrics of a quantised model against the original
(``metrics``); ``python -m moejax.posthoc quantise`` (``command``). See docs/quantisation.md.

    from moejax import quant
    rules = quant.parse_rules("experts=int4/g128;shared=int8;attention=int8")
    new_variables, tensors = quant.quantize(config, variables, rules)
"""
from moejax.quant.formats import Format, int_format
from moejax.quant.formats import parse as parse_format
from moejax.quant.rules import TARGETS, Matrix, Rule, assign, matrices
from moejax.quant.rules import parse as parse_rules
from moejax.quant.transform import Part, Tensor, load_tensors, materialise, quantize, save_tensors

__all__ = ["TARGETS", "Format", "Matrix", "Part", "Rule", "Tensor", "assign", "int_format", "load_tensors",
           "materialise", "matrices", "parse_format", "parse_rules", "quantize", "save_tensors"]
