"""Weight-only quantised decoding: the model's matrices held as int8 or packed int4 codes with float32 scales, and
dequantised inside the jitted forward pass, layer by layer, as the decode loop runs.

    variables_q = quant.decode.quantise(config, variables, "int4/g32")   # QuantisedWeight leaves
    tokens = moejax.generate.generate(config, variables_q, prompts, max_new_tokens=64)
    # the same: generate(config, variables, prompts, max_new_tokens=64, quantise="int4/g32")
    # the CLI: python -m moejax.generate --checkpoint=DIR --quantise=int8

``quantise`` rounds to nearest (``moejax.quant.transform.quantize``, so the codes are those of ``python -m
moejax.posthoc quantise --method=rtn``) the targets ``DEFAULT_TARGETS`` (attention, routed and shared experts, dense
MLPs; the routers, embeddings, norms and the output head stay as they are) and replaces each quantised parameter
with a ``QuantisedWeight``: int<b> codes (b > 4: one int8 per weight; b <= 4: two's-complement nibbles, two per
byte, ``moejax.quant.formats.pack``'s layout) and the float32 scales per output channel or group of inputs.
``materialise`` (called by ``moejax.generate`` on the variables inside its jitted prefill and decode step) computes
``codes * scale`` in float32 and casts to the parameter's dtype, the operations ``formats.dequantize`` does in
numpy, so the weights the model sees are exactly the fake-quantised ones and the tokens are those of generating
with the fake-quantised model. The parameters held between steps are the codes and scales: about a quarter (int8) or
an eighth (int4) of float32 weights for the quantised matrices. XLA does not hoist the dequantisation out of the
decode loop (an int8 -> float conversion grows its operand, which its loop-invariant code motion leaves in place),
so every step dequantises the weights it reads. ``generate`` calls ``materialise(variables, routed=False)``: the
routed experts' stacked codes stay codes and the MoE layer takes moejax/moe/quantised.py's path, which in a step
with fewer routed slots than experts (decoding) gathers and dequantises only the experts the slots select
(``model.moe.dispatch_kernel='pallas'``: in the tiles of moejax/kernels/quant_gmm.py's grouped matmul). On a mesh
the codes and scales split over 'expert' as the float weights do (``check_mesh`` names what cannot run).
experiments/bench_quant_decode.py measures memory and speed.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import moe
from moejax.moe.quantised import QuantisedWeight
from moejax.quant import formats, transform
from moejax.quant import rules as rules_lib

DEFAULT_TARGETS = ("attention", "experts", "shared", "dense")
SPEC_HELP = "int<b> (b in 2..8, a scale per output channel) or int<b>/g<G> (a scale per G inputs), e.g. int8, int4/g32"


def parse(spec: Any, field: str = "quantise") -> formats.Format:
    """The int format of a decoding spec; ValueError naming field, the value and what is allowed."""
    try:
        fmt = formats.parse(spec, field) if isinstance(spec, str) else None
    except ValueError:
        fmt = None
    if fmt is None or fmt.kind != "int":
        raise ValueError(f"{field}={spec!r} is not a weight-only decoding format: allowed are {SPEC_HELP}")
    return fmt


def _is_weight(x: Any) -> bool:
    return isinstance(x, QuantisedWeight)


def is_quantised(variables: Mapping[str, Any]) -> bool:
    """Whether any parameter is a QuantisedWeight."""
    return any(_is_weight(leaf) for leaf in jax.tree.leaves(variables.get("params", {}), is_leaf=_is_weight))


def materialise(variables: Any, routed: bool = True) -> Any:
    """variables with every QuantisedWeight dequantised (jax.numpy: call it inside the jitted computation).
    routed=False keeps the routed experts' codes whose experts split apart (``QuantisedWeight.stacked``): the MoE
    layer then reads and dequantises only the experts each step selects (moejax/moe/quantised.py)."""
    def leaf(path, x):
        keep = not routed and _is_weight(x) and x.stacked and any(getattr(p, "key", None) == moe.EXPERTS
                                                                  for p in path)
        return x.dequantise() if _is_weight(x) and not keep else x

    return jax.tree_util.tree_map_with_path(leaf, variables, is_leaf=_is_weight)


def _weight(tensor: transform.Tensor) -> QuantisedWeight | None:
    """The QuantisedWeight of a compact tensor quantised whole in one int format (else None)."""
    matrix = tensor.matrix
    if len(tensor.parts) != 1 or len(tensor.parts[0].index) != matrix.batch or tensor.parts[0].format.kind != "int":
        return None
    part = tensor.parts[0]
    fmt = part.format
    codes = part.arrays["packed"] if fmt.bits <= 4 else part.arrays["codes"]
    if fmt.bits <= 4 and matrix.n % 2 == 0:  # outputs c and c + N/2 share a byte: [B, K, N / 2] (QuantisedWeight)
        grid, _ = formats.unpack(part.arrays, fmt, (matrix.batch, matrix.k, matrix.n))
        nibbles = grid.astype(np.int8).view(np.uint8) & 0x0F
        half = matrix.n // 2
        codes = (nibbles[..., :half] | (nibbles[..., half:] << 4)).astype(np.uint8)
    return QuantisedWeight(jnp.asarray(codes), jnp.asarray(part.arrays["scales"]), fmt.bits, fmt.tile[0],
                           (matrix.batch, matrix.k, matrix.n), tuple(matrix.shape), tensor.dtype)


def from_tensors(params: Mapping[str, Any], tensors: Mapping[str, transform.Tensor]) -> dict[str, Any]:
    """params with each compact tensor (``transform.quantize``, ``transform.load_tensors``) in place: a
    QuantisedWeight where it is quantised whole in one int format, else its dequantised values."""
    whole = {name: w for name, w in ((name, _weight(t)) for name, t in tensors.items()) if w is not None}
    rest = {name: t for name, t in tensors.items() if name not in whole}
    out = transform.materialise(params, rest) if rest else dict(params)
    return transform.set_paths(out, {tensors[name].matrix.path: w for name, w in whole.items()})


def quantise(config: Any, variables: Mapping[str, Any], spec: str = "int8",
             targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, Any]:
    """variables with the ``targets`` matrices as QuantisedWeight (round to nearest in the int format ``spec``).
    ValueError naming 'quantise' for another format, 'targets' for a target the model lacks entirely."""
    fmt = parse(spec)
    present = {m.target for m in rules_lib.matrices(config, variables["params"])}
    bad = [t for t in targets if t not in rules_lib.TARGETS]
    chosen = [t for t in targets if t in present]
    if bad or not chosen:
        raise ValueError(f"targets={list(targets)!r}: allowed are {', '.join(rules_lib.TARGETS)}, at least one of "
                         f"which the model has (it has {', '.join(sorted(present))})")
    params = jax.tree.map(np.asarray, variables["params"])
    _, tensors = transform.quantize(config, {**variables, "params": params},
                                    [rules_lib.Rule(t, fmt.name) for t in chosen])
    return {**variables, "params": from_tensors(variables["params"], tensors)}


def check_mesh(config: Any, mesh: Any, spec: Any = "int8") -> None:
    """ConfigError naming 'quantise' where quantised decoding cannot run on this mesh: the codes and scales split
    over 'expert' as the float expert weights do, but not over 'tensor' (an int4 byte holds two outputs, a scale a
    group of inputs, and the split would cut them)."""
    from moejax import checks

    if mesh is not None and mesh.shape.get("tensor", 1) > 1:
        checks.fail("quantise", spec, f"quantised decoding splits the experts over mesh.expert only: needs "
                                      f"mesh.tensor=1 (got {mesh.shape['tensor']})")


def prepare(config: Any, variables: Mapping[str, Any], spec: str, mesh: Any = None) -> dict[str, Any]:
    """``moejax.generate``'s ``quantise=``: variables with the weights as int codes and scales (``quantise``, on the
    default targets); ConfigError naming 'quantise' for a bad spec or a mesh it cannot run on (``check_mesh``)."""
    import ml_collections

    from moejax import checks

    try:
        parse(spec)
    except ValueError:
        checks.fail("quantise", spec, f"allowed are {SPEC_HELP}")
    check_mesh(config, mesh, spec)
    whole = config if "model" in config else ml_collections.ConfigDict({"model": config})
    return quantise(whole, variables, spec)


def check_flag(args: Any) -> None:
    """UsageError for ``python -m moejax.generate``'s --quantise: a bad spec, or speculative decoding beside it."""
    from moejax import cli

    if args.quantise == "none":
        return
    try:
        parse(args.quantise)
    except ValueError:
        raise cli.flag_error("quantise", args.quantise, f"allowed are {SPEC_HELP}, or none") from None
    if args.draft is not None or getattr(args, "speculative", None):
        raise cli.flag_error("quantise", args.quantise, "quantised decoding does not combine with speculative "
                                                        "decoding (--draft, --speculative)")


def param_bytes(variables: Mapping[str, Any]) -> int:
    """Bytes of the parameters as held: a QuantisedWeight's codes and scales, every other array's own."""
    leaves = jax.tree.leaves(variables.get("params", {}), is_leaf=_is_weight)
    return int(sum(leaf.nbytes if _is_weight(leaf) else np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape))
                   for leaf in leaves))


def load(path: Any) -> tuple[Any, dict[str, Any]]:
    """(config, variables) of a compact quantised workdir (``python -m moejax.posthoc quantise --compact``) with the
    int matrices kept as QuantisedWeight (codes and scales, as stored) for ``moejax.generate``; the other quantised
    formats dequantised. ValueError for a workdir that is not compact."""
    import json
    import pathlib

    from moejax import loading
    from moejax.quant import compact
    from moejax.training import checkpoint

    layout = compact.read_layout(path)
    if layout is None:
        raise ValueError(f"{path} is not a compact quantised workdir (no {compact.LAYOUT_FILE}; python -m "
                         f"moejax.posthoc quantise --compact writes one)")
    config = loading.config_from_json(json.loads((pathlib.Path(path) / "config.json").read_text()))
    state, _ = checkpoint.load_checkpoint(path)
    params, tensors = compact.from_tree(state["params"], layout)
    return config, {"params": jax.tree.map(jnp.asarray, from_tensors(params, tensors)),
                    "moe_state": jax.tree.map(jnp.asarray, state.get("moe_state") or {})}
