"""Post-hoc research on a trained MoE model's routing: routing traces (``trace``: the format, a streaming writer and
a memory-mapped reader) and their analyses (``analysis``: expert load, router entropy, co-activation, inter-layer
affinity, local routing consistency, token/expert specialisation, summary and plots). numpy only; matplotlib is
imported by the plot functions alone.

    from moejax.posthoc import analysis, read_trace
    trace = read_trace("traces/run1")
    analysis.summary(trace)
"""
from moejax.posthoc import analysis
from moejax.posthoc.trace import Trace, TraceWriter, read_trace, write_trace

__all__ = ["Trace", "TraceWriter", "analysis", "read_trace", "write_trace"]

# Expert pruning and merging, pure functions on (config, variables) (moejax/posthoc/prune.py, merge.py). They need jax
# and the model, so they load on first use: importing moejax.posthoc for traces and analyses stays numpy only.
_LAZY = ("merge", "prune")
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
