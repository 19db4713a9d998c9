"""Routed experts: the expert interface, the GLU experts, and the grouped-matmul backends that run them.

An expert kind (``Experts``) declares its parameters (stacked on a leading expert axis, with logical axis names
for sharding), how one expert maps its rows (``apply_one``: the dense reference), and how a grouped matmul runs
all experts on expert-sorted rows (``apply_ragged``). ``grouped_apply`` runs either on any backend. The kinds are
``GLUExperts`` ('glu') and ``GPTOSSExperts`` ('gpt_oss', biased and clamped SwiGLU); ``EXPERT_KINDS`` maps
``model.moe.expert_kind`` to a class.

Backends compute the GLU of every row of the expert buffer with the weights of the expert owning that row:
* 'tiled': the buffer is cut into tiles of ``plan.tile`` rows, each owned by one expert; a loop over the used
  tiles runs plain matmuls with that expert's weights. Fast on XLA:CPU, where ragged_dot is slow.
* 'ragged_dot': ``jax.lax.ragged_dot`` over the per-expert row counts (TPU/GPU).
* 'megablox': jax's Pallas TPU grouped matmul (``jax.experimental.pallas.ops.tpu.megablox.gmm``), interpreted on
  CPU (tests only). K and N are zero-padded to whole tiles and the rows past the groups are masked, so any shape is
  exact.
* 'tokamax': ``tokamax.ragged_dot`` where the package is installed (``pip install tokamax``); it picks its own
  kernel per platform (Triton/Mosaic GPU, Mosaic TPU, XLA elsewhere).

'auto' picks 'tiled' on CPU, 'megablox' on TPU, and on GPU 'tokamax' when it imports, else 'ragged_dot'. A Pallas
grouped matmul of our own for float weights is not shipped: the design admits one only where it measures faster
than these, and no accelerator has been available to measure it. Expert weights held as int codes (quantised
decoding) go through moejax/moe/quantised.py, which dequantises the selected experts for these backends or runs
moejax/kernels/quant_gmm.py's dequantising grouped matmul.
"""
import dataclasses
import functools
import importlib.util
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from moejax import vma
from moejax.moe.dispatch import Plan

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "relu": jax.nn.relu,
}
BACKENDS = ("auto", "tiled", "ragged_dot", "megablox", "tokamax")
# Backends that take the exact ragged layout (dropless plans with tile 1) rather than whole tiles per expert.
RAGGED_BACKENDS = ("ragged_dot", "megablox", "tokamax")
MEGABLOX_TILE = 128


TOKAMAX_MISSING = ("needs the tokamax package (pip install tokamax); allowed without it: 'auto', 'tiled', "
                   "'ragged_dot', 'megablox'")


def tokamax_installed() -> bool:
    return importlib.util.find_spec("tokamax") is not None


def _tokamax():
    if not tokamax_installed():
        raise ValueError(f"model.moe.gmm_backend='tokamax' {TOKAMAX_MISSING}")
    import tokamax

    return tokamax


def resolve_backend(backend: str) -> str:
    """'auto' -> 'tiled' on CPU, 'megablox' on TPU, 'tokamax' on GPU where installed (else 'ragged_dot')."""
    if backend == "tokamax":
        _tokamax()
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "cpu":
        return "tiled"
    if platform == "tpu":
        return "megablox"
    return "tokamax" if tokamax_installed() else "ragged_dot"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def megablox_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, tile: int = MEGABLOX_TILE,
                 interpret: bool | None = None) -> jax.Array:
    """lhs [M, K] @ rhs[g] for each group g of consecutive rows -> [M, N]; rows past sum(group_sizes) are 0.

    megablox wants whole (tm, tk, tn) tiles: K and N are zero-padded to multiples of ``tile`` and M to a multiple
    of the row tile (the padding is sliced off, zeros add nothing). Rows past the groups come back from the kernel
    unwritten, so they are masked on the way in and out (the mask also drops their garbage gradients).
    """
    from jax.experimental.pallas.ops.tpu.megablox import gmm

    interpret = jax.default_backend() == "cpu" if interpret is None else interpret
    (m, k), n = lhs.shape, rhs.shape[2]
    tm = min(tile, _round_up(m, 8))
    mp, kp, np_ = _round_up(m, tm), _round_up(k, tile), _round_up(n, tile)
    live = (jnp.arange(mp) < group_sizes.sum())[:, None]
    x = jnp.where(live, jnp.pad(lhs, ((0, mp - m), (0, kp - k))), 0)
    w = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n)))
    out = gmm(x, w, group_sizes.astype(jnp.int32), preferred_element_type=lhs.dtype, tiling=(tm, tile, tile),
              interpret=interpret)
    return jnp.where(live, out, 0)[:m, :n]


def ragged_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, backend: str) -> jax.Array:
    """The grouped matmul of one backend among RAGGED_BACKENDS: lhs [M, K], rhs [G, K, N] -> [M, N]."""
    if backend == "megablox":
        return megablox_gmm(lhs, rhs, group_sizes)
    if backend == "tokamax":
        return _tokamax().ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def glu(x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, activation: str) -> jax.Array:
    """(act(x @ wi_0) * (x @ wi_1)) @ wo. x: [..., D]; wi_*: [D, F]; wo: [F, D]."""
    act = ACTIVATIONS[activation]
    return (act(x @ wi_0) * (x @ wi_1)) @ wo


Weights = tuple[jax.Array, ...]  # an expert kind's parameters in ``param_names`` order, each [E, ...]
GroupedMatmul = Callable[[jax.Array, jax.Array], jax.Array]  # lhs [M, K], rhs [E, K, N] -> [M, N] by row groups
Linear = Callable[[jax.Array, str], jax.Array]  # (h, matrix name) -> h @ W[name] (+ its bias) for h's expert


def one_linear(expert, weights: Weights) -> Linear:
    """``linear`` of one expert's weights (no expert axis, in ``param_names`` order): h @ W + b."""
    named = dict(zip(expert.param_names, weights, strict=True))

    def linear(h: jax.Array, name: str) -> jax.Array:
        out = h @ named[name]
        bias = expert.biases.get(name)
        return out if bias is None else out + named[bias]

    return linear


def ragged_linear(expert, weights: Weights, rows: jax.Array, matmul: GroupedMatmul) -> Linear:
    """``linear`` of the stacked weights [E, ...] on the expert-sorted rows [R, D] through a grouped matmul; a bias
    [E, N] comes from the same grouped matmul of a column of ones with the biases as [E, 1, N] matrices."""
    named = dict(zip(expert.param_names, weights, strict=True))
    ones = jnp.ones((rows.shape[0], 1), rows.dtype) if expert.biases else None

    def linear(h: jax.Array, name: str) -> jax.Array:
        out = matmul(h, named[name])
        bias = expert.biases.get(name)
        return out if bias is None else out + matmul(ones, named[bias][:, None, :])

    return linear


@dataclasses.dataclass(frozen=True)
class GLUExperts:
    """E GLU experts: expert e maps x [m, D] to (act(x @ wi_0[e]) * (x @ wi_1[e])) @ wo[e].

    Parameters: wi_0, wi_1 [E, D, F], wo [E, F, D]. Frozen and hashable: a static argument of custom VJPs.
    ``matrices``: the parameters used as linear maps (``forward`` runs each product through ``linear``, so that a
    wrapper kind such as LoRA's moejax/adapters/expert_lora.py ``AdaptedExperts`` can add to it); ``biases``: the bias
    added after each matrix.
    ``zero_init``: the parameters initialised to zeros (biases; the others take the layer's kernel initialiser).
    ``after_contraction``: the parameters added after the contraction over the hidden width F (an output bias),
    which a layer that splits F over devices and sums the partial outputs must count once.
    """

    activation: str = "silu"
    zero_init = ()
    after_contraction = ()

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "GLUExperts":
        return cls(cfg.activation)

    param_names = ("wi_0", "wi_1", "wo")
    param_axes = {"wi_0": ("expert", "embed", "mlp"), "wi_1": ("expert", "embed", "mlp"),
                  "wo": ("expert", "mlp", "embed")}

    def param_shapes(self, num_experts: int, d_model: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return {"wi_0": (num_experts, d_model, hidden), "wi_1": (num_experts, d_model, hidden),
                "wo": (num_experts, hidden, d_model)}

    matrices = ("wi_0", "wi_1", "wo")
    biases = {}  # matrix name -> the bias added after it

    def forward(self, x: jax.Array, linear: Linear) -> jax.Array:
        """The expert's map with every product by a matrix (and its bias) through ``linear(h, name)``."""
        act = ACTIVATIONS[self.activation]
        return linear(act(linear(x, "wi_0")) * linear(x, "wi_1"), "wo")

    def apply_one(self, x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array) -> jax.Array:
        """One expert's weights (no expert axis) on x [m, D] -> [m, D]: the dense reference."""
        return self.forward(x, one_linear(self, (wi_0, wi_1, wo)))

    def apply_ragged(self, rows: jax.Array, weights: Weights, matmul: GroupedMatmul) -> jax.Array:
        """Every expert on its consecutive group of rows [R, D] through a grouped matmul."""
        return self.forward(rows, ragged_linear(self, weights, rows, matmul))


@dataclasses.dataclass(frozen=True)
class GPTOSSExperts:
    """E GPT-OSS experts: expert e maps x [m, D] to (clip(u, -limit, limit) + 1) * g * sigmoid(alpha * g) @ wo[e]
    + bo[e], with g = min(x @ wi_0[e] + bi_0[e], limit) (the gate) and u = x @ wi_1[e] + bi_1[e] (the up
    projection).

    Parameters: wi_0, wi_1 [E, D, F], wo [E, F, D], bi_0, bi_1 [E, F], bo [E, D] (biases zero at init).
    """

    limit: float = 7.0
    alpha: float = 1.702

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> "GPTOSSExperts":
        return cls(float(cfg.swiglu_limit), float(cfg.swiglu_alpha))

    param_names = ("wi_0", "wi_1", "wo", "bi_0", "bi_1", "bo")
    param_axes = {"wi_0": ("expert", "embed", "mlp"), "wi_1": ("expert", "embed", "mlp"),
                  "wo": ("expert", "mlp", "embed"), "bi_0": ("expert", "mlp"), "bi_1": ("expert", "mlp"),
                  "bo": ("expert", "embed")}
    zero_init = ("bi_0", "bi_1", "bo")
    after_contraction = ("bo",)

    def param_shapes(self, num_experts: int, d_model: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return {"wi_0": (num_experts, d_model, hidden), "wi_1": (num_experts, d_model, hidden),
                "wo": (num_experts, hidden, d_model), "bi_0": (num_experts, hidden), "bi_1": (num_experts, hidden),
                "bo": (num_experts, d_model)}

    def gate(self, gate: jax.Array, up: jax.Array) -> jax.Array:
        """The clamped gated unit of the pre-activations gate, up [..., F] -> [..., F]."""
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))

    matrices = ("wi_0", "wi_1", "wo")
    biases = {"wi_0": "bi_0", "wi_1": "bi_1", "wo": "bo"}

    def forward(self, x: jax.Array, linear: Linear) -> jax.Array:
        """The expert's map with every product by a matrix (and its bias) through ``linear(h, name)``."""
        return linear(self.gate(linear(x, "wi_0"), linear(x, "wi_1")), "wo")

    def apply_one(self, x: jax.Array, wi_0: jax.Array, wi_1: jax.Array, wo: jax.Array, bi_0: jax.Array,
                  bi_1: jax.Array, bo: jax.Array) -> jax.Array:
        """One expert's weights (no expert axis) on x [m, D] -> [m, D]: the dense reference."""
        return self.forward(x, one_linear(self, (wi_0, wi_1, wo, bi_0, bi_1, bo)))

    def apply_ragged(self, rows: jax.Array, weights: Weights, matmul: GroupedMatmul) -> jax.Array:
        """Every expert on its consecutive group of rows [R, D] through a grouped matmul; each row's biases come
        from the same grouped matmul of a column of ones with the biases as [E, 1, N] matrices."""
        return self.forward(rows, ragged_linear(self, weights, rows, matmul))


Experts = GLUExperts | GPTOSSExperts

# model.moe.expert_kind -> class. A new kind: a frozen dataclass with from_config, param_names, param_axes,
# param_shapes, zero_init, after_contraction, matrices, biases, forward, apply_one and apply_ragged, and one line here.
EXPERT_KINDS: dict[str, type[Experts]] = {"glu": GLUExperts, "gpt_oss": GPTOSSExperts}


def from_config(cfg: ml_collections.ConfigDict) -> Experts:
    """The expert kind of a ``model.moe`` section."""
    return EXPERT_KINDS[cfg.expert_kind].from_config(cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tiled_apply(expert: Experts, tiles: jax.Array, weights: Weights, tile_expert: jax.Array,
                used_tiles: jax.Array) -> jax.Array:
    """Each tile through its expert, looping over the ``used_tiles`` first tiles only.

    tiles: [G, m, D]; weights: the expert kind's [E, ...] parameters; tile_expert: [G] int32 -> [G, m, D], unused
    tiles 0. A loop of plain matmuls reads each expert's weights in place (no [G, D, F] gather) and skips the
    padding tiles that the static worst-case layout reserves.
    """

    def body(i, out):
        e = tile_expert[i]
        return out.at[i].set(expert.apply_one(tiles[i], *(w[e] for w in weights)))

    init = vma.varying_like(jnp.zeros_like(tiles), tiles, *weights, tile_expert)
    return jax.lax.fori_loop(0, used_tiles, body, init)


def _tiled_apply_fwd(expert, tiles, weights, tile_expert, used_tiles):
    # symbolic zeros: the primals come wrapped, and a weight that nothing differentiates (a frozen base under LoRA)
    # is marked in the residuals' structure (a 1-tuple) so that the backward pass computes no gradient for it
    tiles, tile_expert, used_tiles = tiles.value, tile_expert.value, used_tiles.value
    marked = tuple(w.value if w.perturbed else (w.value,) for w in weights)
    weights = tuple(w.value for w in weights)
    out = tiled_apply(expert, tiles, weights, tile_expert, used_tiles)
    return out, (tiles, marked, tile_expert, used_tiles)


def _tiled_apply_bwd(expert, res, grad_out):
    tiles, marked, tile_expert, used_tiles = res
    live = tuple(not isinstance(w, tuple) for w in marked)
    weights = tuple(w if keep else w[0] for w, keep in zip(marked, live, strict=True))
    trained = tuple(w for w, keep in zip(weights, live, strict=True) if keep)

    def tile_grads(i):
        e = tile_expert[i]
        per_expert = tuple(w[e] for w in weights)

        def apply(x, *grads_of):  # apply_one with the weights that get a gradient as arguments
            given = iter(grads_of)
            return expert.apply_one(x, *(next(given) if keep else w
                                         for w, keep in zip(per_expert, live, strict=True)))

        _, vjp = jax.vjp(apply, tiles[i], *(w for w, keep in zip(per_expert, live, strict=True) if keep))
        return e, vjp(grad_out[i])

    def accumulate(i, grads, e, tile, live_tile=True):
        grad_tiles, *grad_w = grads
        d_x, *d_w = (jnp.where(live_tile, d, 0) for d in tile)
        grad_w = (g.at[e].add(d.astype(jnp.float32)) for g, d in zip(grad_w, d_w, strict=True))
        return (grad_tiles.at[i].set(d_x), *grad_w)

    # The first tile runs outside the loop so that the carry takes the types (inside shard_map: the varying
    # axes) that jax.vjp gives the per-tile gradients; it counts only when some tile is used.
    zeros = (jnp.zeros_like(tiles), *(jnp.zeros(w.shape, jnp.float32) for w in trained))
    first = accumulate(0, zeros, *tile_grads(0), live_tile=used_tiles > 0)
    grad_tiles, *grad_w = jax.lax.fori_loop(1, used_tiles, lambda i, g: accumulate(i, g, *tile_grads(i)), first)
    given = iter(vma.sum_to_type(g.astype(w.dtype), w) for g, w in zip(grad_w, trained, strict=True))
    return vma.sum_to_type(grad_tiles, tiles), tuple(next(given) if keep else None for keep in live), None, None


tiled_apply.defvjp(_tiled_apply_fwd, _tiled_apply_bwd, symbolic_zeros=True)


def grouped_apply(expert: Experts, rows: jax.Array, weights: Weights, plan: Plan, backend: str) -> jax.Array:
    """Each buffer row [R, D] through the expert owning it (by ``plan``) on one backend."""
    if backend in RAGGED_BACKENDS:
        return expert.apply_ragged(rows, weights, lambda lhs, rhs: ragged_matmul(lhs, rhs, plan.expert_rows, backend))
    tiles = rows.reshape(-1, plan.tile, rows.shape[-1])
    return tiled_apply(expert, tiles, weights, plan.tile_expert, plan.used_tiles).reshape(rows.shape)
