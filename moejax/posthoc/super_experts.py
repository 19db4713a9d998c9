"""Super experts (Su et al. 2025, "Unveiling Super Experts in Mixture-of-Experts Large Language Models", arXiv
2507.23279): the few experts whose down-projection outputs carry extreme activation outliers, which become the
massive activations of the residual stream that the model cannot lose. Every expert is a candidate, the shared
experts included, as in the authors' profiler (ZunhaiSu/Super-Experts-Profilling ``eval_utils.py``: a forward hook
on every down projection).

    from moejax.posthoc import super_experts
    found = super_experts.find(config, variables, batches)     # rule='paper'
    found.super_experts                                         # [(model layer, expert), ...] routed experts
    found.shared_super_experts                                  # [model layer, ...] flagged shared experts
    super_experts.plot(found, path="super_experts.png")

Profile: a[l, e] = max over the calibration tokens routed to expert e at MoE layer l (null slots left out) of
max_d |f_e(x_t)_d|, f_e(x_t) the expert's down-projection output on the token (its output before the gate weight,
biases included for kinds with an output bias; ``capture.slot_outputs``); a[l, e] = 0 for an expert no token was
routed to. ``channel[l, e]`` is the d of that maximum. For a model with shared experts, s[l] = max over every
calibration token of max_d |g_s(x_t)_d|, g_s the shared experts' fused GLU (their down-projection output, before
Qwen2-MoE's sigmoid shared gate; ``capture.LayerCapture.shared``), and ``shared_channel[l]`` its d.

Rules (``flag``), over the set A of all L x E values a[l, e] and the L values s[l] (every expert, shared ones
included):

* 'paper':      a[l, e] > P_q(A) and a[l, e] > max(A) * fraction (q = 99.5, fraction = 1/10: the paper's rule);
* 'percentile': a[l, e] > P_q(A);
* 'top_n':      the n largest values of A (ties to the lower layer, then the lower expert, a layer's shared experts
  after its routed ones).

P_q is ``numpy.percentile`` (linear interpolation). With |A| <= 200 values, P_99.5 lies between the two largest,
so the paper's rule flags the largest expert whenever the two differ: on small models read ``max_output`` (is the
flagged one far above the rest?) rather than the flag alone.

Massive activations: per MoE layer the max and the median of |h_after| (the block's output, every token and
channel) and their ratio; the median is the median of the batches' medians (exact for one batch; a corpus-wide
median would need every value).

Attention sinks (``attention_sinks``): the paper finds that the super experts induce the attention sinks, the
attention that every query gives the sequence's first token, and that pruning them removes it. Per MoE layer
(the attention of that layer's block), the mean attention weight a query gives position 0 of its row,

    sink[l] = mean over rows b, heads n and query positions t >= 1 of softmax_j(q_t k_j / sqrt(d))[j = 0]

(the layer's own scale, causal mask, sliding window and learned sink logits; position 0's query, which sees only
itself, left out), and ``sink_decay(before, after) = (before - after) / before``: the share of the sink a
change (super experts pruned: ``zero_experts``-style variables, or an intervention) removes.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import attention as attention_lib
from moejax import model as model_lib
from moejax.posthoc import capture

SINK = capture.PREFIX + "sink"  # the attention-sink statistic sown by ``attention_sinks``' interceptor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RULES = ("paper", "percentile", "top_n")


@dataclasses.dataclass
class Profile:
    """The raw profile of a calibration set (see the module docstring). Rows in the order of ``layers`` (the
    model's MoE layers)."""

    layers: np.ndarray  # [L] model layer index of each row
    max_output: np.ndarray  # [L, E] float64 a[l, e]: max |down-projection output| over the tokens routed to e
    channel: np.ndarray  # [L, E] int64 the channel of that max (-1: never routed)
    counts: np.ndarray  # [L, E] int64 routed slots
    residual_max: np.ndarray  # [L] float64 max |h_after|
    residual_median: np.ndarray  # [L] float64 median |h_after| (median over batches of each batch's median)
    num_tokens: int
    shared_max_output: np.ndarray | None = None  # [L] float64 s[l]: max |shared down-projection output|; None: none
    shared_channel: np.ndarray | None = None  # [L] int64 the channel of that max

    def values(self) -> np.ndarray:
        """[L, E] a[l, e], or [L, E + 1] with s[l] as the last column for a model with shared experts: the set A
        the rules read."""
        if self.shared_max_output is None:
            return self.max_output
        return np.concatenate([self.max_output, np.asarray(self.shared_max_output, np.float64)[:, None]], axis=1)

    @property
    def residual_ratio(self) -> np.ndarray:
        """[L] residual_max / residual_median (inf where the median is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.residual_median > 0, self.residual_max / self.residual_median, np.inf)


@dataclasses.dataclass
class SuperExperts:
    """A profile and the experts a rule flags."""

    profile: Profile
    flagged: np.ndarray  # [L, E] bool: flagged routed experts
    rule: str
    threshold: float  # the rule's cut: a[l, e] must be above it (top_n: the n-th largest value, included)
    percentile: float
    fraction: float
    top_n: int | None
    flagged_shared: np.ndarray | None = None  # [L] bool: flagged shared experts (None: the model has none)

    @property
    def super_experts(self) -> list[tuple[int, int]]:
        """[(model layer index, expert id)] of the flagged routed experts, by decreasing a[l, e]."""
        rows, cols = np.nonzero(self.flagged)
        order = np.argsort(-self.profile.max_output[rows, cols], kind="stable")
        return [(int(self.profile.layers[rows[i]]), int(cols[i])) for i in order]

    @property
    def shared_super_experts(self) -> list[int]:
        """[model layer index] of the layers whose shared experts are flagged, by decreasing s[l]."""
        if self.flagged_shared is None:
            return []
        rows = np.flatnonzero(self.flagged_shared)
        order = np.argsort(-np.asarray(self.profile.shared_max_output)[rows], kind="stable")
        return [int(self.profile.layers[rows[i]]) for i in order]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable summary (lists; inf as None)."""
        p = self.profile
        ratio = [None if not np.isfinite(r) else float(r) for r in p.residual_ratio]
        return {"rule": self.rule, "percentile": self.percentile, "fraction": self.fraction, "top_n": self.top_n,
                "threshold": self.threshold, "super_experts": [list(pair) for pair in self.super_experts],
                "layers": p.layers.tolist(), "num_tokens": p.num_tokens, "max_output": p.max_output.tolist(),
                "channel": p.channel.tolist(), "counts": p.counts.tolist(), "flagged": self.flagged.tolist(),
                "residual_max": p.residual_max.tolist(), "residual_median": p.residual_median.tolist(),
                "residual_max_over_median": ratio, "shared_super_experts": self.shared_super_experts,
                "shared_max_output": None if p.shared_max_output is None else p.shared_max_output.tolist(),
                "shared_channel": None if p.shared_channel is None else p.shared_channel.tolist(),
                "flagged_shared": None if self.flagged_shared is None else self.flagged_shared.tolist()}


def _reduction(config: ml_collections.ConfigDict) -> Callable[[capture.Capture], dict]:
    def fn(c: capture.Capture) -> dict:
        peaks, channels, medians, maxima = [], [], [], []
        for layer in c.layers:
            outputs = jnp.abs(capture.slot_outputs(config, layer).astype(jnp.float32))  # [T, k, D]
            peaks.append(outputs.max(-1))
            channels.append(outputs.argmax(-1).astype(jnp.int32))
            residual = jnp.abs(layer.h_after.astype(jnp.float32))
            maxima.append(residual.max())
            medians.append(jnp.median(residual))
        out = {"experts": jnp.stack([layer.routing.experts for layer in c.layers]), "peak": jnp.stack(peaks),
               "channel": jnp.stack(channels), "residual_max": jnp.stack(maxima),
               "residual_median": jnp.stack(medians), "tokens": jnp.asarray(c.tokens.size, jnp.int32)}
        if config.model.moe.num_shared > 0:  # the shared experts' down projection, every token
            shared = [jnp.abs(layer.shared.astype(jnp.float32)).max(0) for layer in c.layers]  # [D] per layer
            out["shared_peak"] = jnp.stack([column.max() for column in shared])
            out["shared_channel"] = jnp.stack([column.argmax().astype(jnp.int32) for column in shared])
        return out

    return fn


def profile(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], *,
            intervention: Any = None, progress: Callable[[int], None] | None = None, mesh: Any = None) -> Profile:
    """The super-expert profile of the model over ``batches`` (token ids [B, S], the model's inputs);
    ``intervention``: under a routing intervention (``capture.forward``); ``mesh``: the forward sharded over a
    device mesh (``capture.stream``)."""
    layers = capture.check_supported(config)
    num_layers, num_experts = len(layers), config.model.moe.num_experts
    best = np.full((num_layers, num_experts), -np.inf)
    channel = np.full((num_layers, num_experts), -1, np.int64)
    counts = np.zeros((num_layers, num_experts), np.int64)
    residual_max = np.zeros(num_layers, np.float64)
    with_shared = config.model.moe.num_shared > 0
    shared_best = np.full(num_layers, -np.inf) if with_shared else None
    shared_channel = np.full(num_layers, -1, np.int64) if with_shared else None
    medians: list[np.ndarray] = []
    tokens = 0
    for arrays in capture.stream(config, variables, batches, _reduction(config), intervention=intervention,
                                 progress=progress, mesh=mesh):
        experts, peak, where = (np.asarray(arrays[key]) for key in ("experts", "peak", "channel"))
        for row in range(num_layers):
            valid = (experts[row] >= 0) & (experts[row] < num_experts)
            ids, values, chans = experts[row][valid], peak[row][valid].astype(np.float64), where[row][valid]
            counts[row] += np.bincount(ids, minlength=num_experts)
            top = np.full(num_experts, -np.inf)
            np.maximum.at(top, ids, values)
            at_top = values == top[ids]  # the slots holding their expert's maximum: the lowest channel among them
            top_channel = np.full(num_experts, np.iinfo(np.int64).max)
            np.minimum.at(top_channel, ids[at_top], chans[at_top].astype(np.int64))
            update = top > best[row]  # an earlier batch keeps a tie
            best[row] = np.where(update, top, best[row])
            channel[row] = np.where(update, top_channel, channel[row])
        if with_shared:
            peak_shared = np.asarray(arrays["shared_peak"], np.float64)
            update = peak_shared > shared_best  # an earlier batch keeps a tie
            shared_best = np.where(update, peak_shared, shared_best)
            shared_channel = np.where(update, np.asarray(arrays["shared_channel"], np.int64), shared_channel)
        residual_max = np.maximum(residual_max, np.asarray(arrays["residual_max"], np.float64))
        medians.append(np.asarray(arrays["residual_median"], np.float64))
        tokens += int(arrays["tokens"])
    if not medians:
        raise ValueError("super_experts.profile: no batches")
    return Profile(layers=np.asarray(layers, np.int64), max_output=np.where(counts > 0, best, 0.0), channel=channel,
                   counts=counts, residual_max=residual_max, residual_median=np.median(np.stack(medians), axis=0),
                   num_tokens=tokens, shared_max_output=shared_best, shared_channel=shared_channel)


def _first_token_weight(q: jax.Array, k: jax.Array, *, scale: float | None = None, window: int = 0,
                        sinks: jax.Array | None = None, chunk: int = 0) -> jax.Array:
    """[2]: the sum over rows, heads and query positions t >= 1 of the attention weight on key position 0, and the
    number of terms; ``moejax.attention.attend``'s softmax (q [B, T, N, Dk], k [B, T, K, Dk], the same scale,
    causal mask, window, sink logits and chunks)."""
    weights = attention_lib.attention_weights(q, k, scale=scale, window=window, sinks=sinks, chunk=chunk)
    first = weights[..., 1:, 0]  # [B, K, G, T - 1]: queries t >= 1 on key 0
    return jnp.stack([first.sum(), jnp.asarray(first.size, jnp.float32)])


def _sink_interceptor(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """Around the attention of every MoE block (no KV cache): ``moejax.attention.attend`` also sows the weight its
    queries give position 0."""
    module = context.module
    parent = getattr(module, "parent", None)
    cached = (args[1] if len(args) > 1 else kwargs.get("cache")) is not None
    kinds = attention_lib.Attention | attention_lib.MLAttention
    if (context.method_name != "__call__" or cached or not isinstance(module, kinds)
            or not isinstance(parent, model_lib.Block) or not parent.use_moe):
        return next_fun(*args, **kwargs)
    original = attention_lib.attend
    seen = []

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, **options: Any) -> jax.Array:
        seen.append(_first_token_weight(q, k, **options))
        return original(q, k, v, **options)

    attention_lib.attend = attend
    try:
        out = next_fun(*args, **kwargs)
    finally:
        attention_lib.attend = original
    module.sow(capture.COLLECTION, SINK, seen[0])
    return out


def attention_sinks(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], *,
                    intervention: Any = None, mesh: Any = None) -> np.ndarray:
    """[L] float64: per MoE layer (``moejax.model.moe_layers`` order), the mean attention weight its block's queries
    give the first position of their row over ``batches`` (token ids [B, S]; see the module docstring), under
    ``intervention`` when given; ``mesh``: the model sharded over a device mesh as ``capture.stream`` shards it.
    Compare a model with and without its super experts through ``sink_decay``."""
    layers = capture.check_supported(config)
    cfg = config.model
    paths = model_lib.moe_layer_paths(cfg)
    apply_vars = {key: variables[key] for key in ("params", "moe_state") if variables.get(key) is not None}
    if mesh is not None:
        apply_vars = capture.place_variables(apply_vars, mesh)

    def step(v: Any, tokens: jax.Array, iv: Any) -> jax.Array:
        extra = {} if iv is None else {"intervention": iv}
        with nn.intercept_methods(_sink_interceptor):
            _, sown = model_lib.Transformer(cfg, mesh=mesh).apply(v, tokens, mutable=[capture.COLLECTION], **extra)
        rows = []
        for layer in layers:
            ffn_path, unit = paths[layer]
            tree = sown[capture.COLLECTION]
            for key in (*ffn_path[:-1], "attn"):
                tree = tree[key]
            value = tree[SINK][0]
            rows.append(value if unit is None else value[unit])
        return jnp.stack(rows)

    run = jax.jit(step)
    total = np.zeros((len(layers), 2), np.float64)
    for index, batch in enumerate(batches):
        tokens = np.asarray(batch).astype(np.int32)
        tokens = tokens if mesh is None else capture.place_batch(tokens, mesh, index)
        total += np.asarray(run(apply_vars, tokens, intervention), np.float64)
    if not total[:, 1].any():
        raise ValueError("attention_sinks: no batches (or rows of one token)")
    return total[:, 0] / total[:, 1]


def sink_decay(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(before - after) / before per layer: the share of the attention sink a change removes (NaN where before is
    0)."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, (before - after) / before, np.nan)


def _check_rule(rule: str, percentile: float, fraction: float, top_n: int | None, size: int | None = None) -> None:
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not a super-expert rule: allowed are {RULES}")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile={percentile!r} must lie in [0, 100]")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} (of the largest value) must lie in [0, 1]")
    if rule == "top_n" and (isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 1 or
                            (size is not None and top_n > size)):
        raise ValueError(f"top_n={top_n!r} must be an integer in [1, L * E{'' if size is None else f' = {size}'}] "
                         "with rule='top_n'")


def flag(max_output: np.ndarray, rule: str = "paper", percentile: float = 99.5, fraction: float = 0.1,
         top_n: int | None = None) -> tuple[np.ndarray, float]:
    """(flagged bool, threshold) of the values of A (any shape: a profile's a[l, e] [L, E], or ``Profile.values()``
    with the shared experts' column) under ``rule`` (see the module docstring); flagged has their shape."""
    values = np.asarray(max_output, np.float64)
    _check_rule(rule, percentile, fraction, top_n, values.size)
    if rule == "top_n":
        order = np.argsort(-values.reshape(-1), kind="stable")[:top_n]
        flagged = np.zeros(values.size, bool)
        flagged[order] = True
        return flagged.reshape(values.shape), float(values.reshape(-1)[order[-1]])
    cut = float(np.percentile(values, percentile))
    flagged = values > cut
    if rule == "paper":
        cut = max(cut, float(values.max()) * fraction)
        flagged &= values > float(values.max()) * fraction
    return flagged, cut


def find(config: ml_collections.ConfigDict, variables: Mapping[str, Any], batches: Iterable[Any], *,
         rule: str = "paper", percentile: float = 99.5, fraction: float = 0.1, top_n: int | None = None,
         intervention: Any = None, progress: Callable[[int], None] | None = None, mesh: Any = None
         ) -> SuperExperts:
    """Profiles the model over ``batches`` (on ``mesh`` when given, ``profile``) and flags its super experts by
    ``rule``."""
    _check_rule(rule, percentile, fraction, top_n)  # before the forward pass
    found = profile(config, variables, batches, intervention=intervention, progress=progress, mesh=mesh)
    return classify(found, rule=rule, percentile=percentile, fraction=fraction, top_n=top_n)


def classify(found: Profile, *, rule: str = "paper", percentile: float = 99.5, fraction: float = 0.1,
             top_n: int | None = None) -> SuperExperts:
    """A profile's super experts under ``rule`` over every expert, shared ones included (another rule on the same
    profile needs no new forward pass)."""
    flagged, cut = flag(found.values(), rule, percentile, fraction, top_n)
    num_experts = found.max_output.shape[1]
    shared = None if found.shared_max_output is None else flagged[:, num_experts]
    return SuperExperts(profile=found, flagged=flagged[:, :num_experts], rule=rule, threshold=cut,
                        percentile=percentile, fraction=fraction, top_n=top_n, flagged_shared=shared)


def plot(result: SuperExperts, path: str | os.PathLike | None = None) -> Figure:
    """Left: heatmap of a[l, e] (log colour; MoE layers x experts, the shared experts' s[l] as a last column
    labelled 's' when the model has them), the flagged experts boxed in red. Right: the
    residual stream's max / median |h_after| per MoE layer (log axis). Built without pyplot; saved as PNG when
    ``path`` is given."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    p = result.profile
    grid_values = p.values()
    flagged = result.flagged if result.flagged_shared is None else \
        np.concatenate([result.flagged, result.flagged_shared[:, None]], axis=1)
    num_layers, num_experts = grid_values.shape
    fig = Figure(figsize=(min(4 + 0.25 * num_experts, 18) + 4, 1.8 + 0.35 * num_layers), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[3, 1])
    ax = fig.add_subplot(grid[0])
    values = np.where(grid_values > 0, grid_values, np.nan)
    positive = values[np.isfinite(values)]
    norm = LogNorm(vmin=max(positive.min(), 1e-12), vmax=max(positive.max(), 1e-12)) if positive.size else None
    image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", norm=norm)
    fig.colorbar(image, ax=ax, label="max |down-projection output|")
    for row, col in zip(*np.nonzero(flagged), strict=True):
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_yticks(range(num_layers), [str(layer) for layer in p.layers])
    count = len(result.super_experts) + len(result.shared_super_experts)
    ax.set(xlabel="expert", ylabel="layer", title=f"super experts ({result.rule}): {count} "
                                                  f"flagged over {p.num_tokens:,} tokens")
    if num_experts <= 33:
        labels = [str(e) for e in range(p.max_output.shape[1])] + ([] if p.shared_max_output is None else ["s"])
        ax.set_xticks(range(num_experts), labels)
    bars = fig.add_subplot(grid[1])
    ratio = np.where(np.isfinite(p.residual_ratio), p.residual_ratio, np.nan)
    finite = ratio[np.isfinite(ratio)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:  # massive activations: log axis
        bars.plot(ratio, range(num_layers), "o", color="C1")
        bars.set_xscale("log")
    else:
        bars.barh(range(num_layers), ratio, color="C1")
    bars.set_yticks(range(num_layers), [str(layer) for layer in p.layers])
    bars.set_ylim(-0.5, num_layers - 0.5)
    bars.set(xlabel="max / median |h_after|", title="residual stream")
    if path is not None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig
