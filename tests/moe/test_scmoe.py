"""SCMoE's weak routing (``moejax.moe.intervention.rank_only``; arXiv 2405.14507) against a numpy reference written
from the authors' code (DavidFanzz/SCMoE: ``modeling_models/Mixtral/modeling_mixtral.py``, MixtralSparseMoeBlock,
and ``modeling_models/deepseek-moe/modeling_deepseek.py``, MoEGate): the softmax over every expert, sorted
descending, position r - 1 kept, its weight renormalised over the kept expert where the router renormalises (1) and
the raw probability where it does not; ranks past top_k included (their Mixtral example: rank 3 with top-2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moejax.configs import base

from moejax import generate, model
from moejax.moe import intervene
from moejax.moe import intervention as iv_lib
from moejax.moe.intervention import Intervention, InterventionError
from tests import helpers_configs, helpers_moe
from tests import reference as ref

# Mixtral-style routers renormalise their selected weights (norm_topk_prob; Megatron's softmax after top-k);
# DeepSeekMoE's softmax before top-k without norm_topk_prob does not.
RENORMALISING = ["mixtral", "megatron"]
DEEPSEEK = dict(score="softmax", softmax_before_topk=True, norm_topk_prob=False)


def model_cfg(moe_cfg, num_layers=1):
    m = base.get_config().model
    m.update(vocab_size=32, d_model=16, num_layers=num_layers, num_heads=2, ffn_dim=32)
    m.moe = moe_cfg
    model.validate(m)
    return m


def authors_weak_routing(logits, rank, renormalise, weight=None, exclude=None):
    """[T] expert ids and weights of the weak routing, a loop over tokens as in the authors' gates: softmax over
    every expert, sort descending, keep position rank - 1; weight the probability, divided by itself where the
    router renormalises (Mixtral: ``routing_weights /= routing_weights.sum()``; DeepSeekMoE with norm_topk_prob:
    ``/ (sum + 1e-20)``). ``weight`` 'one'/'score' overrides; ``exclude`` [T, k]: experts the router already
    holds in its slots, skipped before counting past them (rank - k among the rest)."""
    ids, weights = [], []
    for t, row in enumerate(np.asarray(logits, np.float64)):
        probs = np.exp(row - row.max())
        probs /= probs.sum()
        order = [int(e) for e in np.argsort(-probs, kind="stable")]
        if exclude is None:
            e = order[rank - 1]
        else:
            rest = [e for e in order if e not in set(int(x) for x in exclude[t])]
            e = rest[rank - exclude.shape[1] - 1]
        w = probs[e]
        if weight == "one" or (weight is None and renormalise):
            w = w / w
        ids.append(e)
        weights.append(w)
    return np.asarray(ids)[:, None], np.asarray(weights)[:, None]


def lone(router, **fields):
    cfg = helpers_configs.moe(router, **fields)
    module, x, params, _ = helpers_moe.init(cfg)
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = tokens @ np.asarray(params["router"]["kernel"], np.float64)
    return cfg, model_cfg(cfg), module, x, params, tokens, logits


def weak_output(module, params, x, iv, state=None):
    variables = {"params": params} if state is None else {"params": params, "moe_state": state}
    fn = jax.jit(lambda v, x, iv: module.apply(v, x, intervention=iv, layer=0, mutable=["moe_aux"]))
    y, aux = fn(variables, x, iv)
    return np.asarray(y, np.float64).reshape(-1, x.shape[-1]), helpers_moe.lone_stats(aux["moe_aux"])


@pytest.mark.parametrize("router", RENORMALISING + [DEEPSEEK])
@pytest.mark.parametrize("rank", [1, 2, 3, 8])
def test_weak_moe_output_equals_the_authors_routing(router, rank):
    """top-2 of 8 experts: ranks inside top-k (1, 2) and past it (3: the authors' Mixtral example; 8: the last);
    a shared expert (DeepSeekMoE's) added unchanged."""
    cfg, mcfg, module, x, params, tokens, logits = lone(router, num_shared=1)
    renormalises = iv_lib.rank_weight_for(cfg) == "one"
    assert renormalises == (router != DEEPSEEK)
    ids, weights = authors_weak_routing(logits, rank, renormalises)
    y, record = weak_output(module, params, x, iv_lib.rank_only(mcfg, rank))
    assert record.routed_slots == len(tokens)
    np.testing.assert_array_equal(record.tokens_per_expert, np.bincount(ids[:, 0], minlength=8))
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, ids, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router,weight", [("mixtral", "score"), (DEEPSEEK, "one")])
@pytest.mark.parametrize("rank", [2, 3])
def test_the_weight_field_overrides_the_default(router, weight, rank):
    cfg, mcfg, module, x, params, tokens, logits = lone(router)
    ids, weights = authors_weak_routing(logits, rank, None, weight=weight)
    y, _ = weak_output(module, params, x, iv_lib.rank_only(mcfg, rank, weight=weight))
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, ids, weights), rtol=1e-5, atol=1e-5)
    other = "one" if weight == "score" else "score"
    y_other, _ = weak_output(module, params, x, iv_lib.rank_only(mcfg, rank, weight=other))
    assert not np.allclose(y, y_other, atol=1e-4)


def test_rank_within_top_k_with_weight_one_keeps_the_router_slot_bitwise():
    """rank <= k with weight 'one' is the routing moejax always had: the router's slot r - 1 alone, weight 1,
    scaled afterwards (deepseek_v2's groups and routed_scaling_factor left out of the weight)."""
    cfg, mcfg, module, x, params, tokens, logits = lone("deepseek_v2", num_shared=1)
    ids, _ = ref.route_tokens(logits, cfg)
    y, _ = weak_output(module, params, x, iv_lib.rank_only(mcfg, 2, weight="one") |
                       iv_lib.scale_experts(mcfg, {0: {1: 0.5}}))
    weights = np.where(ids[:, 1:] == 1, 0.5, 1.0)
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, ids[:, 1:], weights), rtol=1e-5, atol=1e-5)


def test_past_top_k_skips_masked_experts_and_keeps_forced_ones_first():
    """A forced expert holds slot 1 (rank 1); a masked expert is never the weak one; rank 3 counts the rest of the
    router's ranking past its two slots."""
    cfg, mcfg, module, x, params, tokens, logits = lone("mixtral")
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    top = np.argsort(-probs, axis=-1, kind="stable")
    masked = int(np.bincount(top[:, 2], minlength=8).argmax())  # often the third: masking it moves rank 3
    forced = 0 if masked != 0 else 1
    iv = (iv_lib.rank_only(mcfg, 3) | iv_lib.mask_experts(mcfg, {0: [masked]}) |
          iv_lib.force_experts(mcfg, {0: [forced]}))
    bias = np.zeros(8)
    bias[masked], bias[forced] = -np.inf, np.inf
    slots, _ = ref.route_tokens(logits, cfg, bias)
    ids = []
    for t in range(len(tokens)):
        order = [int(e) for e in top[t] if e != masked and e not in slots[t]]
        ids.append(order[0])
    ids = np.asarray(ids)[:, None]
    y, _ = weak_output(module, params, x, iv)
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, ids, np.ones(ids.shape)), rtol=1e-5, atol=1e-5)
    assert masked not in ids and forced not in ids


def test_past_top_k_with_a_learned_selection_bias_ranks_the_rest_by_score():
    """The layer does not hand ``apply`` its learned selection bias: ranks 1..k are the router's (biased) slots,
    ranks past k the other experts by the router's score."""
    cfg, mcfg, module, x, params, tokens, logits = lone(DEEPSEEK)
    bias = helpers_moe.one_expert_bias(8, expert=3)
    slots, _ = ref.route_tokens(logits, cfg, bias)
    assert (slots[:, 0] == 3).all()
    ids, weights = authors_weak_routing(logits, 3, False, exclude=slots)
    y, _ = weak_output(module, params, x, iv_lib.rank_only(mcfg, 3), state={"router_bias": jnp.asarray(bias)})
    np.testing.assert_allclose(y, ref.moe_layer(tokens, params, ids, weights), rtol=1e-5, atol=1e-5)


def test_apply_given_the_bias_ranks_past_top_k_by_it():
    cfg, mcfg, _, _, _, _, logits = lone(DEEPSEEK)
    bias = np.linspace(0.0, 0.05, 8).astype(np.float32)
    route = iv_lib.routers.route(jnp.asarray(logits, jnp.float32), cfg, bias=jnp.asarray(bias))
    got = intervene.apply(iv_lib.rank_only(mcfg, 4), 0, route, cfg, bias=jnp.asarray(bias))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.argsort(-(probs + bias), axis=-1, kind="stable")[:, 3]
    np.testing.assert_array_equal(np.asarray(got.experts)[:, 0], want)
    assert (np.asarray(got.experts)[:, 1:] == 8).all()
    np.testing.assert_allclose(np.asarray(got.weights)[:, 0], probs[np.arange(len(want)), want], rtol=1e-6)


def test_a_rank_past_the_experts_is_refused():
    mcfg = model_cfg(helpers_configs.moe(), num_layers=2)
    cases = [
        (lambda: iv_lib.rank_only(mcfg, 9), r"rank=9 is invalid: must be an integer in \[1, "
                                            r"model\.moe\.num_experts=8\]"),
        (lambda: Intervention.create(mcfg, rank=np.array([0, 9])), r"rank\[1\]=9.*\[1, model\.moe\.num_experts=8\]"),
        (lambda: iv_lib.rank_only(mcfg, 0), r"rank=0"),
        (lambda: iv_lib.rank_only(mcfg, 2, weight="half"), r"rank_weight='half'.*'score', 'one'"),
        (lambda: iv_lib.rank_only(mcfg, 3, weight="one") | iv_lib.rank_only(mcfg, 3, weight="score"),
         r"rank_weight='score'.*same rank_weight"),
        (lambda: (iv_lib.mask_experts(mcfg, {1: range(6)}) | iv_lib.rank_only(mcfg, 3)).check(mcfg),
         r"mask\[1\].*3 experts \(2 slots, rank 3\)"),
        (lambda: iv_lib.rank_only(model_cfg(helpers_configs.moe("deepseek_v2")), 5),
         r"rank=5.*experts of the kept groups"),
    ]
    for build, message in cases:
        with pytest.raises(InterventionError, match=message):
            build()
    iv_lib.rank_only(mcfg, 8)  # the last expert is a rank
    iv_lib.rank_only(model_cfg(helpers_configs.moe("deepseek_v2")), 4)


def test_self_contrast_takes_a_rank_past_top_k():
    """SelfContrast(rank=3) on a top-2 model decodes from the strong logits and those under rank_only(cfg, 3)."""
    cfg = model_cfg(helpers_configs.moe(DEEPSEEK), num_layers=2)
    cfg.init_std = 0.5
    net = model.Transformer(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(3), (2, 4), 0, cfg.vocab_size))
    variables = {"params": net.init(jax.random.key(4), jnp.asarray(prompts))["params"]}
    contrast = generate.SelfContrast(rank=3, alpha=0.1, beta=0.5)
    got = generate.generate(cfg, variables, prompts, max_new_tokens=4, contrast=contrast)
    module = model.Transformer(generate.decode_config(cfg))
    forward = jax.jit(lambda v, t, iv: module.apply(v, t, intervention=iv))
    weak = iv_lib.rank_only(cfg, 3)
    assert weak.rank_weight is None and iv_lib.rank_weight_for(cfg) == "score"
    ids = np.zeros((2, 8), np.int32)
    ids[:, :4] = prompts
    for t in range(4, 8):
        strong = np.asarray(forward(variables, jnp.asarray(ids), None), np.float64)[:, t - 1]
        z_weak = np.asarray(forward(variables, jnp.asarray(ids), weak), np.float64)[:, t - 1]
        plausible = strong >= np.log(0.1) + strong.max(-1, keepdims=True)
        ids[:, t] = np.argmax(np.where(plausible, 1.5 * strong - 0.5 * z_weak, -np.inf), axis=-1)
    np.testing.assert_array_equal(got, ids)
    with pytest.raises(Exception, match=r"contrast\.rank=9.*model\.moe\.num_experts=8"):
        generate.generate(cfg, variables, prompts, max_new_tokens=1, contrast=generate.SelfContrast(rank=9))
    with pytest.raises(Exception, match=r"contrast\.weight='half'"):
        generate.generate(cfg, variables, prompts, max_new_tokens=1,
                          contrast=generate.SelfContrast(rank=3, weight="half"))
