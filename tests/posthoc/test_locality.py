"""Tests of moejax/posthoc/locality.py: SRP and SCH as arXiv 2505.16056's code computes them (github.com/ljcleo/moe-lrc,
30_srp_calc.py, 31_srp_refine.py, 41_sch_calc.py, 42_sch_refine.py), against plain-Python re-implementations of the
authors' scripts (the SCH one keeps, as ``calc_fsf`` does, one stack of experts for every cache size at once,
updated token by token and expert by expert; the module simulates one cache per size, vectorised over documents),
on small random traces and on traces whose answer follows by hand; their model pooling and bootstrap intervals;
the hindsight coverage variants under their old and new names."""
import numpy as np
import pytest

from moejax.posthoc import Trace, analysis, locality, locality_coverage, trace_report

E, K = 8, 2
Estimate = locality.Estimate


def make_trace(experts, doc_starts=(0,), num_experts=E) -> Trace:
    experts = np.asarray(experts, np.int32)
    if experts.ndim == 2:  # one layer
        experts = experts[None]
    return Trace(experts=experts, weights=np.ones(experts.shape, np.float32),
                 token_ids=np.zeros(experts.shape[1], np.int32), layers=np.arange(experts.shape[0]),
                 num_experts=num_experts, doc_starts=list(doc_starts))


def random_trace(seed=0, layers=3, tokens=150, doc_starts=(0, 41, 90, 91, 120), sticky=0.5, nulls=True) -> Trace:
    """Top-2 over 8 experts, each layer skewed by its own Dirichlet draw; a token keeps the previous token's experts
    with probability ``sticky`` (local consistency); with ``nulls``, ~8% null slots (ids E and E + 2) and a few
    tokens with one expert in both slots."""
    rng = np.random.default_rng(seed)
    experts = np.empty((layers, tokens, K), np.int32)
    for layer in range(layers):
        p = rng.dirichlet(np.full(E, 0.7))
        for n in range(tokens):
            experts[layer, n] = (experts[layer, n - 1] if n and rng.random() < sticky
                                 else rng.choice(E, size=K, replace=False, p=p))
    if nulls:
        null = rng.random(experts.shape) < 0.08
        experts[null] = rng.choice([E, E + 2], size=int(null.sum()))
        experts[:, [7, 60], 1] = experts[:, [7, 60], 0]  # an expert in both slots of a token
    return make_trace(experts, doc_starts)


# ------------------------------------------------------------------------------------------------ naive references

def naive_documents(trace):
    bounds = [int(s) for s in trace.doc_starts] + [trace.num_tokens]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def token_uses(trace, layer, n):
    """The real experts of token n at a layer in slot order, each once."""
    out = []
    for e in trace.experts[layer, n]:
        e = int(e)
        if 0 <= e < trace.num_experts and e not in out:
            out.append(e)
    return out


def naive_sequence(trace, a, b, layer=None):
    """The expert uses of tokens a..b-1: one list per token (layer None: every layer's, ids offset by l E)."""
    if layer is not None:
        return [token_uses(trace, layer, n) for n in range(a, b)]
    return [[e + layer * trace.num_experts for layer in range(trace.num_layers) for e in token_uses(trace, layer, n)]
            for n in range(a, b)]


def naive_stack_hits(seq, num_experts, future_len):
    """41_sch_calc.py ``calc_fsf`` in its plain form: stat[p] = the uses found at position p of the stack of experts
    (a cache of size c holds its first c entries), taken at the token's start; a first use counts at position uni,
    the distinct experts used before it. prop[x] = (uses of x in the look-ahead) << 32 | (stamp of its last use).
    Each use moves its expert to the top; the entries above its old place are reordered as the cache of every size
    evicts its lowest-prop entry (Mattson's stack update for a priority policy)."""
    f_offset = 1 << 32
    prop = [0] * num_experts
    stat = [0] * num_experts
    stack = []
    ts = 0
    for i in range(min(future_len, len(seq))):
        for x in seq[i]:
            prop[x] += f_offset
    for i, batch in enumerate(seq):
        rank = {x: p for p, x in enumerate(stack)}
        uni = len(stack)
        for x in batch:
            if x in rank:
                stat[rank[x]] += 1
            else:
                stat[uni] += 1
                uni += 1
        for x in batch:
            p = stack.index(x) if x in stack else len(stack)
            if stack and p > 0:
                carried, new = stack[0], [x]
                for j in range(1, p):
                    if prop[stack[j]] > prop[carried]:
                        new.append(stack[j])
                    else:
                        new.append(carried)
                        carried = stack[j]
                stack = new + [carried] + stack[p + 1:]
            elif not stack:
                stack = [x]
            ts += 1
            prop[x] = ((prop[x] >> 32) - 1 << 32) | ts
        if i + future_len < len(seq):
            for x in seq[i + future_len]:
                prop[x] += f_offset
    return stat


def naive_document_rates(trace, layer, length, sizes):
    """Per document with a use: [hit rate at each cache size] (layer None: the model's pooled cache)."""
    num_ids = trace.num_experts * (trace.num_layers if layer is None else 1)
    rates = []
    for a, b in naive_documents(trace):
        seq = naive_sequence(trace, a, b, layer)
        uses = sum(len(batch) for batch in seq)
        if uses:
            stat = naive_stack_hits(seq, num_ids, length)
            rates.append([sum(stat[:c]) / uses for c in sizes])
    return np.array(rates).reshape(len(rates), len(sizes))


def naive_sch(trace, layer, length, sizes):
    rates = naive_document_rates(trace, layer, length, sizes)
    return rates.mean(0) if len(rates) else np.full(len(sizes), np.nan)


def naive_srp_terms(trace, layer, length):
    """Per document: (M[t], P[t], A) for t = 0 .. length over its windows of ``length`` tokens (every start), with
    n_w(e) the tokens of w whose experts include e (30_srp_calc.py's cnt, 31_srp_refine.py's m, p, a)."""
    terms = []
    for a, b in naive_documents(trace):
        matches, predictions, activations = [0] * (length + 1), [0] * (length + 1), 0
        for start in range(a, b - length + 1):
            uses = [sum(e in token_uses(trace, layer, n) for n in range(start, start + length))
                    for e in range(trace.num_experts)]
            activations += sum(uses)
            for t in range(length + 1):
                chosen = [u for u in uses if u >= t]
                matches[t] += sum(chosen)
                predictions[t] += length * len(chosen)
        terms.append((np.array(matches, float), np.array(predictions, float), activations))
    return terms


def naive_best_f1(matches, predictions, activations):
    f1 = [2 * matches[t] / max(predictions[t] + activations, 1) for t in range(len(matches))]
    best = int(np.argmax(f1))
    return f1[best], (predictions[best] / activations if activations else float("nan"))


def naive_srp(trace, layer, length):
    """(SRP, rho-hat) of one layer (layer None: the model, the layers' terms summed)."""
    layers = range(trace.num_layers) if layer is None else [layer]
    total = [np.zeros(length + 1), np.zeros(length + 1), 0]
    for lay in layers:
        for m, p, a in naive_srp_terms(trace, lay, length):
            total = [total[0] + m, total[1] + p, total[2] + a]
    if total[2] == 0:
        return float("nan"), float("nan")
    return naive_best_f1(*total)


def naive_basic_interval(value, replicates, confidence):
    n_boot = len(replicates)
    low = round(n_boot * ((1 - confidence) / 2))
    q = sorted(replicates)
    return 2 * value - q[min(n_boot - low, n_boot - 1)], 2 * value - q[low]


@pytest.fixture(scope="module")
def trace():
    return random_trace()


# ------------------------------------------------------------------------------------------------------------- SCH

def test_sch_by_hand_cyclic_routing():
    """Experts 0, 1, 2, 0, 1, 2 (one per token), a cache of 2: the first two uses fill it (hits). With a
    look-ahead of 1 (the current token only) the policy is LRU and every later use misses: 2 of 6. With a
    look-ahead of 2 the expert needed next stays (t3 and t5 hit): 4 of 6. With the whole document ahead, 0 and 1
    both have one upcoming use at t2 and the least recently used, 0, leaves before its use at t3: 3 of 6 (t5)."""
    t = make_trace([[0], [1], [2], [0], [1], [2]], num_experts=3)
    sch = locality.segment_cache_hit_rate(t, [1, 2, 6], [1, 2, 3])
    np.testing.assert_allclose(sch[0], [[1 / 6, 2 / 6, 1], [1 / 6, 4 / 6, 1], [1 / 6, 3 / 6, 1]])
    for mi, m in enumerate([1, 2, 6]):
        np.testing.assert_allclose(sch[0, mi], naive_sch(t, 0, m, [1, 2, 3]))


def test_sch_constant_routing_and_full_cache():
    """A layer that always routes to experts {3, 5}: a cache of k = 2 hits every use (the first token's uses are
    the warm-up, counted as hits as the authors count them); a cache of 1 keeps only the slot served last, so one use
    of two hits. A cache of E experts hits every use of any routing."""
    constant = make_trace(np.tile([3, 5], (40, 1)), doc_starts=(0, 17))
    np.testing.assert_allclose(locality.segment_cache_hit_rate(constant, [1, 4, 64], [0.5, 1, 2])[0],
                               [[0.5, 1, 1]] * 3)
    np.testing.assert_allclose(locality.model_cache_hit_rate(constant, [4], [1]), [[1.0]])
    t = random_trace(seed=4)
    np.testing.assert_allclose(locality.segment_cache_hit_rate(t, [1, 16], [E / K]), 1.0)
    np.testing.assert_allclose(locality.model_cache_hit_rate(t, [1, 16], [E / K]), 1.0)


@pytest.mark.parametrize("length", [1, 2, 4, 16, 64])
def test_sch_per_layer_against_the_authors_stack(trace, length):
    sizes = list(range(1, E + 1))  # the authors' grid: every cache size, reported as c / k
    sch = locality.segment_cache_hit_rate(trace, [length], [c / K for c in sizes])
    assert sch.shape == (3, 1, E)
    for layer in range(trace.num_layers):
        np.testing.assert_allclose(sch[layer, 0], naive_sch(trace, layer, length, sizes), rtol=1e-12)
    assert np.all(np.diff(sch, axis=-1) >= -1e-12)  # a larger cache never hits less (the stack's inclusion)


@pytest.mark.parametrize("length", [1, 3, 16])
def test_sch_model_pooled_against_the_authors_stack(trace, length):
    """One cache over the L E (layer, expert) pairs fed each token's experts of every layer (41_sch_calc.py's
    ``buf``), cache sizes rho L k."""
    sizes = [1, 3, 6, 9, 12, 17, 24]
    layers = trace.num_layers
    sch = locality.model_cache_hit_rate(trace, [length], [c / (layers * K) for c in sizes])
    np.testing.assert_allclose(sch[0], naive_sch(trace, None, length, sizes), rtol=1e-12)


def test_sch_random_shapes_and_chunks(monkeypatch):
    """Other shapes (top-1, top-3 of 5, one long document, documents of one token), the documents simulated in
    chunks of one: the same numbers."""
    for seed, (num_experts, k, starts) in enumerate([(5, 1, (0,)), (5, 3, (0, 1, 2, 30)), (12, 4, (0, 9, 10))]):
        rng = np.random.default_rng(seed)
        experts = np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(2 * 40)]).reshape(2, 40, k)
        t = make_trace(experts, starts, num_experts)
        sizes = list(range(1, num_experts + 1))
        multiples = [c / k for c in sizes]
        expected = [[naive_sch(t, layer, m, sizes) for m in (2, 5)] for layer in range(2)]
        np.testing.assert_allclose(locality.segment_cache_hit_rate(t, [2, 5], multiples), expected, rtol=1e-12)
        pooled = locality.model_cache_hit_rate(t, [3], [c / (2 * k) for c in range(1, 2 * num_experts + 1)])
        np.testing.assert_allclose(pooled[0], naive_sch(t, None, 3, range(1, 2 * num_experts + 1)), rtol=1e-12)
        monkeypatch.setattr(locality, "_SIMULATION_ELEMENTS", 1)
        np.testing.assert_allclose(locality.segment_cache_hit_rate(t, [2, 5], multiples), expected, rtol=1e-12)
        monkeypatch.undo()


def test_sch_null_slots_and_refusals(trace):
    """Null slots and repeats within a token are no uses: a third slot column of null ids changes nothing (the
    cache sizes are multiples of the slots per token, so the same caches are rho = 2/3 and 4/3 there)."""
    padded = make_trace(np.concatenate([trace.experts, np.full((3, trace.num_tokens, 1), E + 4)], axis=2),
                        trace.doc_starts)
    np.testing.assert_allclose(locality.segment_cache_hit_rate(padded, [4, 16], [2 / 3, 4 / 3]),
                               locality.segment_cache_hit_rate(trace, [4, 16], [1, 2]))
    all_null = make_trace(np.full((2, 10, K), E), (0, 5))
    assert np.isnan(locality.segment_cache_hit_rate(all_null, [4])).all()
    with pytest.raises(ValueError, match="not a whole cache size"):
        locality.segment_cache_hit_rate(trace, [4], [0.75])
    with pytest.raises(ValueError, match="not a whole cache size"):
        locality.segment_cache_hit_rate(trace, [4], [0])
    with pytest.raises(ValueError, match="segment lengths"):
        locality.segment_cache_hit_rate(trace, [0])


# ------------------------------------------------------------------------------------------------------------- SRP

def test_srp_by_hand():
    """Constant routing: the threshold t = m predicts every token exactly, SRP = 1 at every m. Routing alternating
    between two disjoint pairs, m = 2: every window uses 4 experts once; t = 1 gives M = 4, P = 8, A = 4 per
    window, F1 = 8 / 12 = 2/3 (t = 2 predicts nothing; t = 0 all 8 experts): SRP(2) = 2/3, rho-hat = 2."""
    constant = make_trace(np.tile([3, 5], (40, 1)), doc_starts=(0, 17))
    np.testing.assert_allclose(locality.segment_routing_performance(constant, [1, 4, 16]), 1.0)
    alternating = make_trace(np.array([[0, 1], [2, 3]] * 20), doc_starts=(0, 11))
    srp = locality.routing_performance_interval(alternating, [2], n_boot=20)
    assert srp.layers.value[0, 0] == pytest.approx(2 / 3) and srp.ratio[0][0, 0] == pytest.approx(2.0)
    assert srp.layers.lower[0, 0] == pytest.approx(2 / 3) and srp.layers.upper[0, 0] == pytest.approx(2 / 3)


@pytest.mark.parametrize("length", [1, 2, 4, 7, 16])
def test_srp_against_the_authors_scripts(trace, length):
    srp = locality.routing_performance_interval(trace, [length], n_boot=1)
    for layer in range(trace.num_layers):
        value, ratio = naive_srp(trace, layer, length)
        assert srp.layers.value[layer, 0] == pytest.approx(value) and srp.ratio[0][layer, 0] == pytest.approx(ratio)
    value, ratio = naive_srp(trace, None, length)
    assert srp.model.value[0] == pytest.approx(value) and srp.ratio[1][0] == pytest.approx(ratio)
    np.testing.assert_allclose(locality.segment_routing_performance(trace, [length]), srp.layers.value)
    np.testing.assert_allclose(locality.model_routing_performance(trace, [length]), srp.model.value)
    if length == 1:
        np.testing.assert_allclose(srp.layers.value, 1.0)


def test_srp_windows_never_cross_documents(trace, monkeypatch):
    """Lengths longer than every document are NaN; windows read in blocks of 2 tokens give the numbers of one
    block."""
    assert np.isnan(locality.segment_routing_performance(trace, [60])).all()
    assert np.isnan(locality.model_routing_performance(trace, [60])).all()
    reference = locality.segment_routing_performance(trace, [3, 8])
    monkeypatch.setattr(analysis, "_BLOCK_ELEMENTS", 16)
    np.testing.assert_allclose(locality.segment_routing_performance(trace, [3, 8]), reference)


# ------------------------------------------------------------------------------------------------------- bootstrap

def test_srp_bootstrap_against_resampled_documents(trace):
    """The replicates are the SRPs of D documents drawn with replacement (one draw for every layer, length and the
    model), their threshold found anew; the interval the basic one at the authors' indices."""
    n_boot, confidence, seed, length = 40, 0.9, 7, 4
    srp = locality.routing_performance_interval(trace, [length], n_boot=n_boot, confidence=confidence, seed=seed)
    docs = len(trace.doc_starts)
    draws = np.random.default_rng(seed).integers(0, docs, size=(n_boot, docs))
    per_layer = [naive_srp_terms(trace, layer, length) for layer in range(trace.num_layers)]
    for layer in [*range(trace.num_layers), None]:
        terms = [[sum(parts) for parts in zip(*(per_layer[lay][d] for lay in range(trace.num_layers)), strict=True)]
                 for d in range(docs)] if layer is None else per_layer[layer]
        replicates = [naive_best_f1(*(sum(terms[d][i] for d in draw) for i in range(3)))[0] for draw in draws]
        estimate = srp.model if layer is None else Estimate(*(a[layer] for a in (
            srp.layers.value, srp.layers.lower, srp.layers.upper)))
        low, high = naive_basic_interval(float(estimate.value[0]), replicates, confidence)
        assert estimate.lower[0] == pytest.approx(low) and estimate.upper[0] == pytest.approx(high)



def test_sch_bootstrap_against_resampled_documents(trace):
    """The documents' hit rates resampled with replacement, fresh draws per layer in order and then for the
    model (41_sch_calc.py ``stat``)."""
    n_boot, confidence, seed, lengths, multiples = 30, 0.8, 3, [2, 8], [1, 2]
    sch = locality.cache_hit_rate_interval(trace, lengths, multiples, n_boot=n_boot, confidence=confidence,
                                           seed=seed)
    rng = np.random.default_rng(seed)
    layers = trace.num_layers
    for layer in [*range(layers), None]:
        sizes = [int(rho * K * (layers if layer is None else 1)) for rho in multiples]
        rates = np.stack([naive_document_rates(trace, layer, m, sizes) for m in lengths], axis=1)  # [D, M, C]
        draws = rng.integers(0, len(rates), size=(n_boot, len(rates)))
        estimate = sch.model if layer is None else Estimate(sch.layers.value[layer], sch.layers.lower[layer],
                                                            sch.layers.upper[layer])
        np.testing.assert_allclose(estimate.value, rates.mean(0))
        for mi in range(len(lengths)):
            for ci in range(len(multiples)):
                replicates = [rates[draw, mi, ci].mean() for draw in draws]
                low, high = naive_basic_interval(rates[:, mi, ci].mean(), replicates, confidence)
                assert estimate.lower[mi, ci] == pytest.approx(low)
                assert estimate.upper[mi, ci] == pytest.approx(high)


def test_bootstrap_contains_the_estimate_shrinks_and_is_seeded():
    small = random_trace(seed=1, layers=2, tokens=400, doc_starts=range(0, 400, 40), nulls=False)
    large = random_trace(seed=1, layers=2, tokens=1600, doc_starts=range(0, 1600, 40), nulls=False)
    widths = []
    for t in (small, large):
        srp = locality.routing_performance_interval(t, [4, 16], n_boot=200, seed=0)
        sch = locality.cache_hit_rate_interval(t, [4], [1, 2], n_boot=200, seed=0)
        for estimate in (srp.layers, srp.model, sch.layers, sch.model):
            assert np.all(estimate.lower <= estimate.value + 1e-12) and np.all(estimate.value <= estimate.upper + 1e-12)
        widths.append([float(np.mean(e.upper - e.lower)) for e in (srp.layers, srp.model, sch.layers, sch.model)])
    assert np.all(np.array(widths[1]) < np.array(widths[0]))  # 4x the documents: narrower intervals
    a = locality.routing_performance_interval(small, [4], n_boot=50, seed=11)
    b = locality.routing_performance_interval(small, [4], n_boot=50, seed=11)
    c = locality.routing_performance_interval(small, [4], n_boot=50, seed=12)
    np.testing.assert_array_equal(a.layers.lower, b.layers.lower)
    np.testing.assert_array_equal(a.model.upper, b.model.upper)
    assert not np.array_equal(a.layers.lower, c.layers.lower)
    d = locality.cache_hit_rate_interval(small, [4], [1], n_boot=50, seed=11)
    e = locality.cache_hit_rate_interval(small, [4], [1], n_boot=50, seed=11)
    np.testing.assert_array_equal(d.layers.lower, e.layers.lower)
    np.testing.assert_array_equal(d.model.upper, e.model.upper)


def test_bootstrap_defaults_and_refusals(trace):
    assert (locality.NUM_BOOTSTRAP, locality.CONFIDENCE, locality.SEGMENT_LENGTHS) == (1000, 0.95, (4, 16, 64, 256))
    replicates = np.arange(10.0)[::-1]  # 10 resamples: lo = round(0.25) = 0, hi = 10 capped at 9
    np.testing.assert_allclose(locality._basic_interval(np.float64(5.0), replicates, 0.95), (1.0, 10.0))
    replicates = np.arange(1000.0)  # the authors' indices 25 and 975
    np.testing.assert_allclose(locality._basic_interval(np.float64(500.0), replicates, 0.95), (25.0, 975.0))
    with pytest.raises(ValueError, match="n_boot >= 1"):
        locality.routing_performance_interval(trace, [4], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        locality.cache_hit_rate_interval(trace, [4], confidence=1.0)


# ------------------------------------------------------------------------------- coverage variants and the summary

def test_routing_coverage_is_cache_coverage_at_k(trace):
    np.testing.assert_allclose(locality_coverage.segment_routing_coverage(trace, [1, 4]),
                               locality_coverage.segment_cache_coverage(trace, [1, 4], [K])[..., 0])


def test_summary_headline_is_the_authors(trace):
    s = trace_report.summary(trace, lengths=[2, 8], n_boot=20, seed=5)
    assert s["segment_lengths"] == [2, 8] and s["cache_multiples"] == [1.0, 2.0] and s["cache_sizes"] == [K, 2 * K]
    assert s["bootstrap"]["n_boot"] == 20
    srp = locality.routing_performance_interval(trace, [2, 8], n_boot=20, seed=5)
    sch = locality.cache_hit_rate_interval(trace, [2, 8], [1, 2], n_boot=20, seed=5)
    for key, expected in (("srp", srp.layers.value), ("srp_model", srp.model.value), ("srp_model_low", srp.model.lower),
                          ("sch", sch.layers.value), ("sch_model", sch.model.value), ("sch_high", sch.layers.upper),
                          ("srp_coverage", locality_coverage.segment_routing_coverage(trace, [2, 8])),
                          ("sch_coverage", locality_coverage.segment_cache_coverage(trace, [2, 8]))):
        np.testing.assert_allclose(np.array(s[key], float), expected, err_msg=key)
    fig = trace_report.plot_local_consistency(trace, [2, 8], n_boot=20, seed=5, summary=s)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), srp.model.value)
    assert [line.get_label() for line in fig.axes[1].get_lines()][:2] == [
        "SCH, model, rho = 1 (6 of 24)", "SCH, model, rho = 2 (12 of 24)"]
