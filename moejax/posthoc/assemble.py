"""Assembling an MoE from several dense models (DUME, BTX, FlexOlmo): each source's FFN becomes one routed expert of
every layer, the other parameters are averaged, and the router is initialised from data as each recipe does.

    from moejax.posthoc import assemble
    config, variables = assemble.assemble([(cfg_a, vars_a), (cfg_b, vars_b)], recipe="dume",
                                          domains=[batches_a, batches_b])

* ``dume`` (Fanì & Ersoy 2026, "Training-Free Dynamic Upcycling of Expert Language Models", arXiv 2603.29765; code
  github.com/gensyn-ai/dume ``models/mixture_of_experts.py``, ``clm_moerging_strategies_eval.py``): the router of
  every layer is the closed-form ridge regression from the layer's MoE input x (with a constant 1) to the one-hot
  source id, over each source's domain data run through the assembled model with every token sent to that source's
  expert: W = (A + lambda I)^-1 B with A = sum [x;1][x;1]^T, B = sum [x;1] onehot(i)^T; each column of W is then
  divided by the norm of its weight part (the bias entry too). Top-k of the logits (k = 1 by default), softmax over
  the k selected; lambda = 1e-2.
* ``btx`` (Sukhbaatar et al. 2024, Branch-Train-MiX, arXiv 2403.07816): the router is freshly initialised (normal,
  the model's init_std) and learned afterwards: train the assembled model (``python -m moejax.main`` with
  ``init_from='run:<dir>'``); top-2 with the softmax over every expert and the Switch balance loss, as BTX trains.
* ``flexolmo`` (Shi et al. 2025, FlexOlmo, arXiv 2507.07024): each expert's router row is the mean of the layer's MoE
  input over its source's domain data (a domain embedding), normalised to unit norm; top-k of the logits.

Sources are moejax dense models (``model.moe_every = 0``) of one architecture. A source's GLU FFN
``layers_{i}/ffn/{wi_0, wi_1, wo}`` becomes expert j of MoE layer i (``experts/{wi_0, wi_1, wo}[j]``); every other
parameter is the mean over the sources (BTX and DUME average them; FlexOlmo trains its experts from one public model,
so they start equal there). The assembled model is a moejax model like any other (traces, pruning, training,
export).
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from moejax import model as model_lib
from moejax import moe

RECIPES = ("dume", "btx", "flexolmo")
FFN_NAMES = ("wi_0", "wi_1", "wo")


def _check_sources(sources: Sequence[tuple[ml_collections.ConfigDict, Any]]) -> ml_collections.ConfigDict:
    if len(sources) < 2:
        raise ValueError(f"assemble needs at least 2 source models, got {len(sources)}")
    first = sources[0][0].model
    if first.moe_every != 0 or first.scan_layers:
        raise ValueError("assemble takes dense sources with unrolled layers (model.moe_every=0, "
                         f"model.scan_layers=False); source 0 has moe_every={first.moe_every}, "
                         f"scan_layers={first.scan_layers}")
    for i, (config, _) in enumerate(sources[1:], 1):
        if config.model.to_dict() != first.to_dict():
            differ = sorted(k for k, v in config.model.to_dict().items() if first.to_dict().get(k) != v)
            raise ValueError(f"source {i} has another architecture than source 0 (model fields {differ}); assemble "
                             f"needs one architecture")
    return first


def moe_config(config: ml_collections.ConfigDict, num_sources: int, recipe: str, top_k: int | None = None
               ) -> ml_collections.ConfigDict:
    """The assembled model's config: every layer MoE with one routed expert per source of the sources' FFN width;
    the recipe's router (DUME and FlexOlmo: logits with a bias, top-k then softmax over the k; BTX: top-2 of the
    softmax over every expert with the Switch balance loss)."""
    new = copy.deepcopy(config)
    m = new.model
    m.moe_every, m.first_dense_layers, m.dense_layers = 1, 0, ()
    moe_cfg = m.moe
    moe_cfg.update(num_experts=num_sources, expert_ffn=m.ffn_dim, num_shared=0, shared_ffn=0, expert_kind="glu",
                   activation=moe_cfg.activation, dispatch="dropless", num_null_experts=0)
    moe_cfg.router.update(kind="topk", score="softmax", num_groups=1, topk_groups=1)
    if recipe == "btx":
        moe_cfg.top_k = min(2 if top_k is None else top_k, num_sources)
        moe_cfg.router.update(softmax_before_topk=True, norm_topk_prob=True, bias=False)
        moe_cfg.update(balance_loss="switch")
    else:
        moe_cfg.top_k = min(1 if top_k is None else top_k, num_sources)
        moe_cfg.router.update(softmax_before_topk=False, norm_topk_prob=False, bias=recipe == "dume")
        moe_cfg.update(balance_loss="none")
    model_lib.validate(m)
    return new


def _average(trees: Sequence[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.mean([np.asarray(x, np.float64) for x in xs], axis=0).astype(
        np.asarray(xs[0]).dtype), *trees)


def combine(sources: Sequence[tuple[ml_collections.ConfigDict, Any]], config: ml_collections.ConfigDict,
            seed: int = 0) -> dict[str, Any]:
    """The assembled variables with the router still at its initialisation (normal(init_std), bias 0): the sources'
    FFNs stacked as experts, the rest averaged."""
    params = [jax.tree.map(np.asarray, dict(v["params"])) for _, v in sources]
    shapes = jax.eval_shape(model_lib.Transformer(config.model).init, jax.random.key(seed),
                            np.zeros((1, 4), np.int32))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for key in params[0]:
        if key.startswith("layers_") and "ffn" in params[0][key]:
            layer = dict(_average([p[key] for p in params]))
            ffns = [p[key]["ffn"] for p in params]
            router = shapes["params"][key]["ffn"][moe.ROUTER]
            layer["ffn"] = {moe.EXPERTS: {name: np.stack([np.asarray(f[name]) for f in ffns]) for name in FFN_NAMES},
                            moe.ROUTER: {name: (np.zeros(leaf.shape, np.float32) if name == "bias" else
                                                rng.normal(0, config.model.init_std, leaf.shape).astype(np.float32))
                                         for name, leaf in router.items()}}
            out[key] = layer
        else:
            out[key] = _average([p[key] for p in params])
    variables = {"params": out}
    if "moe_state" in shapes:
        variables["moe_state"] = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes["moe_state"])
    return variables


def _layer_inputs(config: ml_collections.ConfigDict, variables: Any, batches: Iterable[Any], expert: int
                  ) -> Iterable[dict[int, np.ndarray]]:
    """Per batch, ``{MoE layer: its MoE inputs [T, D] float64}`` of the assembled model with every token of every
    layer sent to ``expert`` (DUME's ``expert_id`` forward)."""
    from moejax.moe import intervention
    from moejax.posthoc import capture

    layers = model_lib.moe_layers(config.model)
    forced = intervention.force_experts(config, {layer: [expert] for layer in layers})
    for captured in capture.stream(config, variables, batches, lambda c: {layer.layer: layer.inputs
                                                                          for layer in c.layers},
                                   intervention=forced):
        yield {int(layer): np.asarray(x, np.float64) for layer, x in captured.items()}


def ridge_router(config: ml_collections.ConfigDict, variables: Any, domains: Sequence[Iterable[Any]],
                 lam: float = 1e-2) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """DUME's router per MoE layer: ``{layer: (kernel [D, E], bias [E])}`` (module docstring)."""
    layers = model_lib.moe_layers(config.model)
    d, num = config.model.d_model, len(domains)
    a = {layer: np.zeros((d + 1, d + 1)) for layer in layers}
    b = {layer: np.zeros((d + 1, num)) for layer in layers}
    for source, batches in enumerate(domains):
        for inputs in _layer_inputs(config, variables, batches, source):
            for layer, x in inputs.items():
                xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
                a[layer] += xb.T @ xb
                b[layer][:, source] += xb.sum(0)
    out = {}
    for layer in layers:
        w = np.linalg.solve(a[layer] + lam * np.eye(d + 1), b[layer])
        kernel, bias = w[:-1], w[-1]
        norm = np.linalg.norm(kernel, axis=0)
        norm = np.where(norm == 0.0, 1e-6, norm)
        out[layer] = ((kernel / norm).astype(np.float32), (bias / norm).astype(np.float32))
    return out


def domain_router(config: ml_collections.ConfigDict, variables: Any, domains: Sequence[Iterable[Any]]
                  ) -> dict[int, np.ndarray]:
    """FlexOlmo-style router per MoE layer: ``{layer: kernel [D, E]}``, column i the unit-norm mean MoE input over
    source i's domain data (its tokens sent to expert i)."""
    layers = model_lib.moe_layers(config.model)
    sums = {layer: np.zeros((config.model.d_model, len(domains))) for layer in layers}
    for source, batches in enumerate(domains):
        count = 0
        for inputs in _layer_inputs(config, variables, batches, source):
            for layer, x in inputs.items():
                sums[layer][:, source] += x.sum(0)
            count += len(next(iter(inputs.values())))
        for layer in layers:
            sums[layer][:, source] /= max(count, 1)
    return {layer: (s / np.maximum(np.linalg.norm(s, axis=0), 1e-12)).astype(np.float32) for layer, s in sums.items()}


def assemble(sources: Sequence[tuple[ml_collections.ConfigDict, Any]], recipe: str = "dume",
             domains: Sequence[Iterable[Any]] | None = None, *, top_k: int | None = None, lam: float = 1e-2,
             seed: int = 0) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """(config, variables) of the MoE assembled from ``sources`` [(config, variables) of dense moejax models] by
    ``recipe`` (``RECIPES``). ``domains``: per source, the batches [B, S] of its domain's token ids (DUME and
    FlexOlmo; BTX needs none). The config is the first source's with every layer MoE (``moe_config``)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r}: allowed are {', '.join(RECIPES)}")
    base = _check_sources(sources)
    del base
    if recipe != "btx" and (domains is None or len(domains) != len(sources)):
        raise ValueError(f"recipe={recipe!r} needs domains: one calibration set per source ({len(sources)}), got "
                         f"{0 if domains is None else len(domains)}")
    config = moe_config(sources[0][0], len(sources), recipe, top_k)
    variables = combine(sources, config, seed)
    if recipe == "btx":
        return config, variables
    domains = [list(batches) for batches in domains]
    routers = ridge_router(config, variables, domains, lam) if recipe == "dume" else domain_router(
        config, variables, domains)
    for layer, router in routers.items():
        target = variables["params"][f"layers_{layer}"]["ffn"][moe.ROUTER]
        if recipe == "dume":
            target["kernel"], target["bias"] = router
        else:
            target["kernel"] = router
    return config, variables
