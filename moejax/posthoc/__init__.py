"""Post-hoc research on a trained MoE model (a moejax run or an imported release), without retraining or editing
model code.

* routing traces (``trace``: the format, a streaming writer and a memory-mapped reader) and their analyses
  (``analysis``: expert load, router entropy, co-activation, inter-layer affinity, token/expert specialisation;
  ``locality``: local routing consistency, SRP and SCH as arXiv 2505.16056 computes them, with bootstrap intervals)
  and ``trace_report`` (the ``analyze`` command's summary and plots); numpy only, matplotlib imported by the plot
  functions alone;
* capture (``capture``): per MoE layer what a forward pass computes (residual stream before and after, MoE input,
  router logits, the layer's routing, MoE output, expert outputs of the routed slots), batch by batch under jit;
  ``record`` writes a routing trace from it;
* expert importance (``importance``: one registry of criteria, frequency, soft count, REAP, EASY-EP, from a trace or
  a forward pass), pruning and merging (``prune``, ``merge``: pure functions on ``(config, variables)``, sharing the
  core of ``compress``), super experts (``super_experts``);
* the command line: ``python -m moejax.posthoc trace|analyze|importance|prune|merge|super-experts`` (docs/posthoc.md).

    from moejax.posthoc import read_trace, trace_report
    moejax.posthoc.record(config, variables, batches, "traces/run1", eos_id=0)
    trace_report.summary(read_trace("traces/run1"))
    scores = moejax.posthoc.importance.from_forward(config, variables, batches, "reap")      # [L, E]
"""
from moejax.posthoc import analysis, locality, trace_report
from moejax.posthoc.trace import Trace, TraceWriter, read_trace, write_trace

__all__ = ["Trace", "TraceWriter", "analysis", "locality", "read_trace", "trace_report", "write_trace"]

# The modules that need jax and the model load on first use: importing moejax.posthoc for traces and analyses stays
# numpy only.
_LAZY = ("capture", "compress", "importance", "merge", "prune", "super_experts")
_LAZY_FUNCTIONS = {"record": "capture"}  # name: the module defining it
__all__ += [*_LAZY, *_LAZY_FUNCTIONS]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
