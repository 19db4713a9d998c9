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
