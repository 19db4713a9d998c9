"""Independent references: naive per-token numpy loops written from the papers' and released models' formulas.

The one home of the suite's numpy references: routing (per token, released models' routers, capacity), the balance
terms, the experts and the whole MoE layer given its routing, the dispatch gathers and grouped matmuls, the
language-model loss, and the post-hoc ones (nPMI of experts and tokens; a pruned model as the original that never
routes to the pruned experts).
"""
import collections
import math

import numpy as np


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def top_indices(values, k):
    """Indices of the k largest values, ties to the lower index (as a stable descending sort)."""
    return list(np.argsort(-np.asarray(values), kind="stable")[:k])


def route_token(logits, *, k, score="softmax", softmax_before_topk=True, norm_topk_prob=False,
                scaling=1.0, num_groups=1, topk_groups=1, group_score="max", fill=0.0, bias=None):
    """One token's routing by the knob definitions. Returns (expert ids, weights), both length k."""
    num_experts = len(logits)
    if score == "softmax":
        scores = softmax(logits) if softmax_before_topk else np.asarray(logits, np.float64)
    else:
        scores = sigmoid(logits)
    choice = scores + (0.0 if bias is None else np.asarray(bias, np.float64))
    if num_groups > 1:
        size = num_experts // num_groups
        group_values = []
        for g in range(num_groups):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_values.append(members[0] if group_score == "max" else members[0] + members[1])
        kept = set(top_indices(group_values, topk_groups))
        choice = np.array([c if i // size in kept else fill for i, c in enumerate(choice)])
    ids = top_indices(choice, k)
    weights = np.array([scores[i] for i in ids])
    if score == "softmax" and not softmax_before_topk:
        weights = softmax(weights)
    if norm_topk_prob:
        weights = weights / weights.sum()
    return ids, weights * scaling


def capacity_keep(experts, weights, num_experts, cap, policy):
    """keep[t][j]: whether slot (t, j) fits its expert's capacity. Loops over experts, then candidates."""
    num_tokens, k = len(experts), len(experts[0])
    keep = [[False] * k for _ in range(num_tokens)]
    for e in range(num_experts):
        slots = [(t, j) for t in range(num_tokens) for j in range(k) if experts[t][j] == e]
        if policy == "probs":
            slots.sort(key=lambda s: -weights[s[0]][s[1]])  # Python's sort is stable: ties keep token order
        for t, j in slots[:cap]:
            keep[t][j] = True
    return keep


def capacity(num_tokens, k, num_experts, factor):
    return math.ceil(factor * num_tokens * k / num_experts)


def balance_terms(experts, probs, num_experts):
    """f_i = count_i / (k T) over all k assignments; P_i = mean_t of normalised scores. Naive loops."""
    num_tokens, k = len(experts), len(experts[0])
    f = np.zeros(num_experts)
    for t in range(num_tokens):
        for j in range(k):
            if experts[t][j] < num_experts:
                f[experts[t][j]] += 1.0 / (k * num_tokens)
    p = np.zeros(num_experts)
    for t in range(num_tokens):
        p += np.asarray(probs[t], np.float64) / np.sum(probs[t]) / num_tokens
    return f, p


def route_tokens(logits, cfg, bias=None):
    """``route_token`` for every row of logits [T, E] with the router knobs of a ``model.moe`` config section.
    Returns (expert ids [T, k] int, weights [T, k] float64)."""
    r = cfg.router
    routed = [route_token(row, k=cfg.top_k, score=r.score, softmax_before_topk=r.softmax_before_topk,
                          norm_topk_prob=r.norm_topk_prob, scaling=r.routed_scaling_factor, num_groups=r.num_groups,
                          topk_groups=r.topk_groups, group_score=r.group_score, fill=r.group_mask_fill, bias=bias)
              for row in np.asarray(logits, np.float64)]
    return np.array([ids for ids, _ in routed]), np.array([w for _, w in routed])


def kept_slots(cfg, ids, weights, train=False):
    """keep [T, k]: the slots a ``model.moe`` config's dispatch computes (all of them when dropless; capacity mode:
    capacity_factor in training, eval_capacity_factor otherwise when set)."""
    if cfg.dispatch != "capacity":
        return np.ones(np.shape(ids), bool)
    factor = cfg.capacity_factor if train or cfg.eval_capacity_factor is None else cfg.eval_capacity_factor
    cap = capacity(len(ids), cfg.top_k, cfg.num_experts, factor)
    return np.array(capacity_keep(ids, weights, cfg.num_experts, cap, cfg.drop_policy))


# ------------------------------------------------------------------ released models' routing, per token
# Re-typed from their reference code (HF transformers modeling files).

def mixtral(logits, k=2):
    p = softmax(logits)
    idx = np.argsort(-p, kind="stable")[:k]
    return idx, p[idx] / p[idx].sum()


def deepseek_v2(logits, k=6, n_group=8, topk_group=3, scaling=16.0):
    scores = softmax(logits)
    group_scores = scores.reshape(n_group, -1).max(-1)
    group_idx = np.argsort(-group_scores, kind="stable")[:topk_group]
    mask = np.zeros(n_group, bool)
    mask[group_idx] = True
    tmp = np.where(np.repeat(mask, len(scores) // n_group), scores, 0.0)
    idx = np.argsort(-tmp, kind="stable")[:k]
    return idx, scores[idx] * scaling


def deepseek_v3(logits, bias, k=8, n_group=8, topk_group=4, scaling=2.5):
    scores = sigmoid(logits)
    for_choice = scores + bias
    group_scores = np.sort(for_choice.reshape(n_group, -1), axis=-1)[:, -2:].sum(-1)
    group_idx = np.argsort(-group_scores, kind="stable")[:topk_group]
    mask = np.zeros(n_group, bool)
    mask[group_idx] = True
    tmp = np.where(np.repeat(mask, len(scores) // n_group), for_choice, 0.0)
    idx = np.argsort(-tmp, kind="stable")[:k]
    w = scores[idx]
    return idx, w / (w.sum() + 1e-20) * scaling


# ------------------------------------------------------------------ experts and the MoE layer


def activation(h, name="silu"):
    """silu h * sigmoid(h); relu max(h, 0); gelu in its tanh form (jax.nn.gelu's default)."""
    if name == "silu":
        return h * sigmoid(h)
    if name == "relu":
        return np.maximum(h, 0.0)
    return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def rms_norm(x, scale, eps=1e-6):
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float64."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def glu(x, wi_0, wi_1, wo, act="silu"):
    """The GLU (act(x @ wi_0) * (x @ wi_1)) @ wo in float64. x: [..., D]; wi_*: [D, F]; wo: [F, D]."""
    x, wi_0, wi_1, wo = (np.asarray(a, np.float64) for a in (x, wi_0, wi_1, wo))
    return (activation(x @ wi_0, act) * (x @ wi_1)) @ wo


def gpt_oss_expert(x, wi_0, wi_1, wo, bi_0, bi_1, bo, limit=7.0, alpha=1.702):
    """GPT-OSS's expert in float64: the gate clamped above at limit, the linear half to [-limit, limit], then
    ((up + 1) * gate * sigmoid(alpha * gate)) @ wo + bo. x: [..., D]; wi_*: [D, F]; bi_*: [F]; wo: [F, D]; bo: [D]."""
    x, wi_0, wi_1, wo, bi_0, bi_1, bo = (np.asarray(a, np.float64) for a in (x, wi_0, wi_1, wo, bi_0, bi_1, bo))
    gate = np.minimum(x @ wi_0 + bi_0, limit)
    up = np.clip(x @ wi_1 + bi_1, -limit, limit)
    return ((up + 1.0) * gate / (1.0 + np.exp(-alpha * gate))) @ wo + bo


def expert(params, e, x, kind="glu"):
    """Routed expert e of an MoE layer's parameters ({'experts': {'wi_0', 'wi_1', 'wo'} [E, ...]}, plus
    'bi_0', 'bi_1', 'bo' for kind 'gpt_oss') on x."""
    names = ("wi_0", "wi_1", "wo") + (("bi_0", "bi_1", "bo") if kind == "gpt_oss" else ())
    weights = [np.asarray(params["experts"][name])[e] for name in names]
    return gpt_oss_expert(x, *weights) if kind == "gpt_oss" else glu(x, *weights)


def moe_layer(tokens, params, ids, weights, keep=None):
    """The MoE layer on tokens [T, D] given its routing: y_t = sum_j keep_tj * w_tj * expert_{e_tj}(x_t) over the
    slots of real experts (ids >= E are null), plus the shared GLU (times sigmoid(x @ shared_gate) when there is
    one). Naive loops in float64."""
    tokens = np.asarray(tokens, np.float64)
    num_experts = np.shape(params["experts"]["wi_0"])[0]
    out = np.zeros(tokens.shape)
    for t in range(len(tokens)):
        for j in range(np.shape(ids)[1]):
            e = int(ids[t][j])
            if e < num_experts and (keep is None or keep[t][j]):
                out[t] += float(weights[t][j]) * expert(params, e, tokens[t])
    if "shared" in params:
        shared = glu(tokens, *(params["shared"][name] for name in ("wi_0", "wi_1", "wo")))
        if "shared_gate" in params:
            shared = shared * sigmoid(tokens @ np.asarray(params["shared_gate"]["kernel"], np.float64))
        out += shared
    return out


def top_p_experts(probs, p, k):
    """Dynamic top-p: walking the experts by descending probability, the fewest whose mass reaches p (the one
    crossing it included), at most k."""
    chosen, mass = [], 0.0
    for i in top_indices(probs, len(probs)):
        if mass >= p or len(chosen) == k:
            break
        chosen.append(i)
        mass += probs[i]
    return chosen


def hash_expert(token_id, num_experts, seed=0):
    """Hash Layers' documented map with Python integers: ((id + seed) * 2654435761 mod 2^32) >> 16, mod E."""
    return (((int(token_id) + seed) * 2654435761) % 2**32 >> 16) % num_experts


# ------------------------------------------------------------------ token dispatch and grouped matmuls
# Index N (the number of source rows) stands for "no row".

def gather_rows(src, idx, scale):
    """out[m] = scale[m] * src[idx[m]], 0 for idx[m] = N."""
    out = np.zeros((len(idx), src.shape[1]), np.float32)
    for m, i in enumerate(idx):
        if i < len(src):
            out[m] = src[i] * scale[m]
    return out


def gather_combine(src, idx, w):
    """out[t] = sum_j w[t, j] * src[idx[t, j]] over the slots with a row."""
    out = np.zeros((idx.shape[0], src.shape[1]), np.float32)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if idx[t, j] < len(src):
                out[t] += w[t, j] * src[idx[t, j]]
    return out


def gather_dot(src, idx, g):
    """out[t, j] = src[idx[t, j]] . g[t], 0 for slots without a row."""
    out = np.zeros(idx.shape, np.float32)
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            if idx[t, j] < len(src):
                out[t, j] = src[idx[t, j]] @ g[t]
    return out


def permute(x, slot_row, num_rows):
    """The expert buffer [num_rows, D]: row slot_row[t, j] holds x[t]; rows no slot maps to are 0."""
    rows = np.zeros((num_rows, x.shape[1]), np.float32)
    for t in range(slot_row.shape[0]):
        for j in range(slot_row.shape[1]):
            if slot_row[t, j] < num_rows:
                rows[slot_row[t, j]] = x[t]
    return rows


def grouped_matmul(lhs, rhs, sizes):
    """lhs [M, K] @ rhs[g] for each group g of sizes[g] consecutive rows; rows past the groups are 0."""
    out = np.zeros((lhs.shape[0], rhs.shape[2]), np.float32)
    start = 0
    for g, size in enumerate(sizes):
        out[start:start + size] = lhs[start:start + size] @ rhs[g]
        start += size
    return out


# ------------------------------------------------------------------ the language-model loss

def cross_entropy(logits, targets) -> float:
    """Mean -log softmax(logits)[target] over every position, in float64. logits [..., V]; targets [...] ids."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, np.asarray(targets)[..., None], -1).mean())


# ------------------------------------------------------------------ post-hoc analysis and compression

def npmi(experts, token_ids, num_experts):
    """nPMI [E, V] of (expert e, token id t) over one layer's routed slots (V = the largest token id + 1), by
    counting: log(p(e, t) / (p(e) p(t))) / -log p(e, t), each probability a share of the real slots (ids < E);
    -1 where e never takes t, 1 where every slot is (e, t). experts [T, k]; token_ids [T]."""
    slots = [(int(e), int(t)) for row, t in zip(experts, token_ids, strict=True) for e in row if 0 <= e < num_experts]
    joint = collections.Counter(slots)
    by_expert = collections.Counter(e for e, _ in slots)
    by_token = collections.Counter(t for _, t in slots)
    total = len(slots)
    out = np.full((num_experts, int(max(token_ids)) + 1), -1.0)
    for (e, t), count in joint.items():
        p = count / total
        out[e, t] = 1.0 if count == total else math.log(p / (by_expert[e] / total * by_token[t] / total)) / -math.log(p)
    return out


def minus_inf_bias(config, variables, keep):
    """The pruning reference: the original variables with every router bias (params router*/bias [E + m], where the
    routers have one) and the selection bias (moe_state router_bias [E]) at -inf on the experts that keep ({model
    layer: kept expert ids}) leaves out, as numpy: a model that never routes to them."""
    import jax

    from moejax import model, moe

    params = jax.tree.map(np.array, variables["params"])
    state = jax.tree.map(np.array, variables["moe_state"])
    paths = model.moe_layer_paths(config.model)
    for layer, kept in keep.items():
        path, unit = paths[layer]
        dropped = np.setdiff1d(np.arange(config.model.moe.num_experts), kept)
        index = () if unit is None else (unit,)
        ffn, ffn_state = params, state
        for key in path:
            ffn, ffn_state = ffn[key], ffn_state[key]
        for key, sub in ffn.items():
            if moe.is_router(key) and "bias" in sub:
                sub["bias"][index + (dropped,)] = -np.inf
        ffn_state[moe.ROUTER_BIAS][index + (dropped,)] = -np.inf
    return {"params": params, "moe_state": state}

