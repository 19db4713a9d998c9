"""Tests of moejax/posthoc: the routing-trace format (in memory, streamed to disk in chunks, read back memory-mapped)
and every analysis against a naive pure-Python computation on small random traces, plus the edge cases (null slots,
a layer where one expert takes everything, segment lengths longer than every document) and the plots."""
import collections
import json
import math
import statistics

import numpy as np
import pytest

from moejax.posthoc import (
    Trace,
    TraceWriter,
    analysis,
    locality,
    locality_coverage,
    read_trace,
    trace_report,
    write_trace,
)
from tests import reference as ref

E, K = 8, 2
DOC_STARTS = [0, 57, 130, 131]  # four documents, one of a single token


def random_trace(seed: int = 0, layers: int = 3, tokens: int = 200, with_scores: bool = True,
                 doc_starts=DOC_STARTS) -> Trace:
    """Skewed top-2 routing over 8 experts with ~8% null slots (ids E and E + 3), a few all-null tokens, expert 7
    never selected at layer position 0, and 20 token ids."""
    rng = np.random.default_rng(seed)
    experts = np.empty((layers, tokens, K), np.int32)
    for layer in range(layers):
        p = rng.dirichlet(np.full(E, 0.7))
        for n in range(tokens):
            experts[layer, n] = rng.choice(E, size=K, replace=False, p=p)
    null = rng.random(experts.shape) < 0.08
    experts[null] = rng.choice([E, E + 3], size=int(null.sum()))
    experts[:, [5, 90]] = E
    experts[0][experts[0] == 7] = E
    return Trace(experts=experts, weights=rng.random(experts.shape).astype(np.float32),
                 scores=rng.dirichlet(np.ones(E), size=(layers, tokens)).astype(np.float32) if with_scores else None,
                 token_ids=rng.integers(0, 20, tokens).astype(np.int32), layers=np.arange(layers) * 2 + 1,
                 num_experts=E, doc_starts=doc_starts, metadata={"corpus": "random"})


@pytest.fixture(scope="module")
def trace():
    return random_trace()


# ------------------------------------------------------------------------------------------------ naive references

def real(trace, layer, n):
    return [int(e) for e in trace.experts[layer, n] if 0 <= e < trace.num_experts]


def naive_counts(trace):
    counts = np.zeros((trace.num_layers, trace.num_experts))
    mass = np.zeros((trace.num_layers, trace.num_experts))
    for layer in range(trace.num_layers):
        for n in range(trace.num_tokens):
            for slot in range(trace.top_k):
                e = int(trace.experts[layer, n, slot])
                if 0 <= e < trace.num_experts:
                    counts[layer, e] += 1
                    mass[layer, e] += float(trace.weights[layer, n, slot])
    return counts, mass


def naive_entropy(trace):
    out = []
    for layer in range(trace.num_layers):
        values = []
        for n in range(trace.num_tokens):
            scores = [float(s) for s in trace.scores[layer, n]]
            total = sum(scores)
            values.append(-sum(s / total * math.log(s / total) for s in scores if s > 0))
        out.append(sum(values) / len(values))
    return np.array(out)


def naive_coactivation(trace):
    joint = np.zeros((trace.num_layers, E, E))
    conditional = np.zeros((trace.num_layers, E, E))
    for layer in range(trace.num_layers):
        both, routed = collections.Counter(), collections.Counter()
        for n in range(trace.num_tokens):
            chosen = set(real(trace, layer, n))
            for i in chosen:
                routed[i] += 1
                for j in chosen:
                    if i != j:
                        both[i, j] += 1
        for (i, j), count in both.items():
            joint[layer, i, j] = count / trace.num_tokens
            conditional[layer, i, j] = count / routed[i]
    return joint, conditional


def naive_affinity(trace):
    out = np.zeros((trace.num_layers - 1, E, E))
    for layer in range(trace.num_layers - 1):
        counts = np.zeros((E, E))
        for n in range(trace.num_tokens):
            for i in real(trace, layer, n):
                for j in real(trace, layer + 1, n):
                    counts[i, j] += 1
        for i in range(E):
            if counts[i].sum():
                out[layer, i] = counts[i] / counts[i].sum()
    return out


def naive_windows(trace, length, stride):
    bounds = list(trace.doc_starts) + [trace.num_tokens]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        start = a
        while start + length <= b:
            yield range(start, start + length)
            start += stride


def naive_sch(trace, layer, length, cache):
    fractions = []
    for window in naive_windows(trace, length, length):
        counts = collections.Counter(e for n in window for e in real(trace, layer, n))
        slots = sum(counts.values())
        if slots:
            fractions.append(sum(sorted(counts.values(), reverse=True)[:cache]) / slots)
    return sum(fractions) / len(fractions) if fractions else float("nan")


def naive_f1(trace, layer, length, stride):
    """The authors' SRP: each token's set of experts (an expert in two slots of one token counts once)."""
    matches, predictions, activations = collections.Counter(), collections.Counter(), 0
    for window in naive_windows(trace, length, stride):
        counts = collections.Counter(e for n in window for e in set(real(trace, layer, n)))
        activations += sum(counts.values())
        for t in range(1, length * trace.top_k + 1):
            chosen = [c for c in counts.values() if c >= t]
            matches[t] += sum(chosen)
            predictions[t] += length * len(chosen)
    if not activations:
        return float("nan")
    return max(2 * matches[t] / (predictions[t] + activations) for t in range(1, length * trace.top_k + 1))


# ----------------------------------------------------------------------------------------------------- the format

def test_trace_normalises_and_validates():
    t = random_trace(doc_starts=[130, 57, 57])
    np.testing.assert_array_equal(t.doc_starts, [0, 57, 130])
    np.testing.assert_array_equal(t.documents, [[0, 57], [57, 130], [130, 200]])
    assert (t.num_layers, t.num_tokens, t.top_k) == (3, 200, K)
    np.testing.assert_array_equal(random_trace(doc_starts=None).doc_starts, [0])
    with pytest.raises(ValueError, match="doc_starts must lie in"):
        random_trace(doc_starts=[0, 200])
    good = random_trace()
    with pytest.raises(ValueError, match="weights"):
        Trace(experts=good.experts, weights=good.weights[:, :10], token_ids=good.token_ids, layers=good.layers,
              num_experts=E)
    with pytest.raises(ValueError, match="scores must be"):
        Trace(experts=good.experts, weights=good.weights, scores=good.scores[..., :3], token_ids=good.token_ids,
              layers=good.layers, num_experts=E)
    with pytest.raises(ValueError, match="layers must be"):
        Trace(experts=good.experts, weights=good.weights, token_ids=good.token_ids, layers=[1, 2], num_experts=E)


def assert_same_trace(a: Trace, b: Trace) -> None:
    for name in ("experts", "weights", "token_ids", "layers", "doc_starts"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.scores is None) == (b.scores is None)
    if a.scores is not None:
        np.testing.assert_array_equal(a.scores, b.scores)
    assert a.num_experts == b.num_experts and a.metadata == b.metadata


def test_writer_in_chunks_reads_back_identical(trace, tmp_path):
    sizes = [30, 70, 1, 99]
    with TraceWriter(tmp_path / "t", trace.layers.tolist(), E, K, with_scores=True,
                     metadata=trace.metadata) as writer:
        start = 0
        for size in sizes:
            end = start + size
            starts = [s - start for s in DOC_STARTS if start <= s < end]
            writer.append(trace.experts[:, start:end], trace.weights[:, start:end], trace.token_ids[start:end],
                          scores=trace.scores[:, start:end], doc_starts=starts)
            start = end
    assert writer.num_tokens == 200 and not (tmp_path / "t" / ".chunks").exists()
    back = read_trace(tmp_path / "t")
    assert isinstance(back.experts.base, np.memmap) or isinstance(back.experts, np.memmap)
    assert back.experts.dtype == np.int32 and back.scores.dtype == np.float32
    assert_same_trace(trace, back)
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    assert manifest["num_tokens"] == 200 and manifest["num_documents"] == 4 and manifest["layers"] == [1, 3, 5]
    # the analyses of the memory-mapped trace are those of the in-memory one
    np.testing.assert_array_equal(locality_coverage.segment_cache_coverage(back, [3]),
                                  locality_coverage.segment_cache_coverage(trace, [3]))


def test_write_trace_without_scores_and_empty(tmp_path):
    plain = random_trace(seed=1, with_scores=False)
    write_trace(plain, tmp_path / "plain", chunk_tokens=64)
    assert_same_trace(plain, read_trace(tmp_path / "plain", mmap=False))
    TraceWriter(tmp_path / "empty", [0, 1], E, K).close()
    empty = read_trace(tmp_path / "empty")
    assert empty.experts.shape == (2, 0, K) and len(empty.doc_starts) == 0
    np.testing.assert_array_equal(analysis.expert_frequency(empty), np.zeros((2, E)))
    assert empty.documents.shape == (0, 2)
    summary = trace_report.summary(empty, lengths=[1, 2])
    json.dumps(summary, allow_nan=False)
    assert summary["num_tokens"] == 0 and summary["srp"] == [[None, None]] * 2


def test_writer_refusals(trace, tmp_path):
    write_trace(trace, tmp_path / "t")
    with pytest.raises(FileExistsError, match="already holds a routing trace"):
        TraceWriter(tmp_path / "t", [0], E, K)
    write_trace(random_trace(seed=2), tmp_path / "t", overwrite=True)
    assert read_trace(tmp_path / "t").experts.shape == (3, 200, K)
    writer = TraceWriter(tmp_path / "w", [0, 1, 2], E, K)
    with pytest.raises(ValueError, match="experts must be"):
        writer.append(trace.experts[:2], trace.weights[:2], trace.token_ids)
    with pytest.raises(ValueError, match="with_scores=False but scores were given"):
        writer.append(trace.experts, trace.weights, trace.token_ids, scores=trace.scores)
    with pytest.raises(ValueError, match="positions within the chunk"):
        writer.append(trace.experts, trace.weights, trace.token_ids, doc_starts=[200])
    with pytest.raises(RuntimeError), TraceWriter(tmp_path / "crashed", [0], E, K) as crashed:
        crashed.append(trace.experts[:1, :10], trace.weights[:1, :10], trace.token_ids[:10])
        raise RuntimeError("stopped while writing")
    with pytest.raises(FileNotFoundError, match="unclosed routing trace"):
        read_trace(tmp_path / "crashed")
    with pytest.raises(FileNotFoundError, match="is .* a routing trace directory"):
        read_trace(tmp_path / "nothing")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    (tmp_path / "t" / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        read_trace(tmp_path / "t")


# ------------------------------------------------------------------------------------------------------ analyses

def test_frequency_mass_and_imbalance(trace):
    counts, mass = naive_counts(trace)
    np.testing.assert_array_equal(analysis.expert_counts(trace), counts)
    np.testing.assert_allclose(analysis.expert_frequency(trace), counts / counts.sum(1, keepdims=True))
    np.testing.assert_allclose(analysis.gate_mass(trace), mass / mass.sum(1, keepdims=True), rtol=1e-6)
    assert analysis.expert_frequency(trace)[0, 7] == 0  # expert 7 is never selected at position 0
    max_over_mean, cv = analysis.load_imbalance(trace)
    for layer in range(trace.num_layers):
        row = list(counts[layer])
        assert max_over_mean[layer] == pytest.approx(max(row) / statistics.mean(row))
        assert cv[layer] == pytest.approx(statistics.pstdev(row) / statistics.mean(row))


def test_router_entropy(trace):
    np.testing.assert_allclose(analysis.router_entropy(trace), naive_entropy(trace), rtol=1e-6)
    with pytest.raises(ValueError, match="needs the router scores"):
        analysis.router_entropy(random_trace(with_scores=False))
    logits = random_trace()
    logits.scores = logits.scores - 0.5
    with pytest.raises(ValueError, match="not logits"):
        analysis.router_entropy(logits)


def test_coactivation(trace):
    joint, conditional = analysis.coactivation(trace)
    expected_joint, expected_conditional = naive_coactivation(trace)
    np.testing.assert_allclose(joint, expected_joint)
    np.testing.assert_allclose(conditional, expected_conditional)
    np.testing.assert_allclose(joint, joint.transpose(0, 2, 1))
    assert not np.diagonal(joint, axis1=1, axis2=2).any()


def test_an_expert_twice_in_one_token():
    """Co-activation and SRP count each token's set of experts; affinity counts every slot combination."""
    t = random_trace()
    t.experts[:, 3:9] = [[2, 2], [2, E], [5, 5], [2, 2], [1, 2], [E, E]]
    for got, expected in zip(analysis.coactivation(t), naive_coactivation(t), strict=True):
        np.testing.assert_allclose(got, expected)
    np.testing.assert_allclose(analysis.inter_layer_affinity(t), naive_affinity(t))
    np.testing.assert_allclose(locality.segment_routing_performance(t, [1, 3]),
                               [[naive_f1(t, layer, m, 1) for m in (1, 3)] for layer in range(3)])


def test_inter_layer_affinity(trace):
    affinity = analysis.inter_layer_affinity(trace)
    assert affinity.shape == (2, E, E)
    np.testing.assert_allclose(affinity, naive_affinity(trace))
    sums = affinity.sum(-1)
    assert np.all(np.isclose(sums, 1.0) | (sums == 0))
    assert sums[0, 7] == 0  # expert 7 is never selected at position 0: its row is 0


@pytest.mark.parametrize("length", [1, 2, 3, 5, 16, 60])
def test_segment_cache_and_routing_best(trace, length):
    caches = [0, 1, 2, 3, 8, 10]
    sch = locality_coverage.segment_cache_coverage(trace, [length], caches)
    srp = locality_coverage.segment_routing_coverage(trace, [length])
    assert sch.shape == (3, 1, 6) and srp.shape == (3, 1)
    for layer in range(trace.num_layers):
        for ci, cache in enumerate(caches):
            assert sch[layer, 0, ci] == pytest.approx(naive_sch(trace, layer, length, cache))
        assert srp[layer, 0] == pytest.approx(naive_sch(trace, layer, length, K))
    np.testing.assert_allclose(sch[..., 0], 0.0)
    np.testing.assert_allclose(sch[..., 4:], 1.0)  # a cache of c >= E experts holds every expert
    if length == 1:
        np.testing.assert_allclose(srp, 1.0)


def test_segments_longer_than_every_document_are_nan(trace):
    np.testing.assert_array_equal(np.isnan(locality_coverage.segment_cache_coverage(trace, [4, 80])[:, :, 0]),
                                  [[False, True]] * 3)
    assert np.isnan(locality.segment_routing_performance(trace, [80])).all()


@pytest.mark.parametrize("length,stride", [(1, 1), (2, 1), (4, 1), (7, 1), (4, 3), (16, 16)])
def test_segment_routing_f1(trace, length, stride):
    f1 = locality.segment_routing_performance(trace, [length], stride=stride)
    for layer in range(trace.num_layers):
        assert f1[layer, 0] == pytest.approx(naive_f1(trace, layer, length, stride))
    if length == 1:
        np.testing.assert_allclose(f1, 1.0)


def test_small_blocks_give_the_same_numbers(trace, monkeypatch):
    """Every analysis reads a layer in blocks of tokens; blocks of 2 tokens (and windows spanning blocks) give the
    numbers of one block."""
    functions = {
        "frequency": analysis.expert_frequency, "mass": analysis.gate_mass, "entropy": analysis.router_entropy,
        "coactivation": lambda t: analysis.coactivation(t)[1], "affinity": analysis.inter_layer_affinity,
        "sch": lambda t: locality_coverage.segment_cache_coverage(t, [1, 3, 8, 40], [1, 2, 5]),
        "f1": lambda t: locality.segment_routing_performance(t, [1, 3, 8], stride=1),
        "npmi": lambda t: analysis.npmi(t, 1),
    }
    reference = {name: f(trace) for name, f in functions.items()}
    monkeypatch.setattr(analysis, "_BLOCK_ELEMENTS", 16)
    assert analysis._block_tokens(trace) == 2
    for name, f in functions.items():
        np.testing.assert_allclose(f(trace), reference[name], err_msg=name)


def test_npmi_slot_events(trace):
    """The slot-level option (events='slot'): every routed slot an event. The token-level default, RICE's
    definition, is checked in tests/posthoc/test_fidelity.py."""
    layer = 1
    expected = ref.npmi(trace.experts[layer], trace.token_ids, trace.num_experts)
    values = analysis.npmi(trace, layer, events="slot")
    vocabulary = int(trace.token_ids.max()) + 1
    assert values.shape == (E, vocabulary)
    np.testing.assert_allclose(values, [[expected[e, t] for t in range(vocabulary)] for e in range(E)])
    assert values.min() >= -1 and values.max() <= 1
    markers = analysis.npmi(trace, layer, [3, 99, 3, 0], events="slot")  # repeated and absent ids
    np.testing.assert_allclose(markers, values[:, [3, 3, 3, 0]] * [1, 0, 1, 1] + [0, -1, 0, 0])
    np.testing.assert_allclose(analysis.npmi(trace, -2, events="slot"), values)  # negative positions from the end
    with pytest.raises(IndexError, match="outside the trace's 3 MoE layers"):
        analysis.npmi(trace, 3)


def test_top_experts_for_token(trace):
    token = int(trace.token_ids[10])
    experts, values = analysis.top_experts_for_token(trace, token, n=3, events="slot")
    assert experts.shape == values.shape == (3, 3)
    for layer in range(trace.num_layers):
        expected = ref.npmi(trace.experts[layer], trace.token_ids, trace.num_experts)
        column = [expected[e, token] for e in range(E)]
        np.testing.assert_allclose(values[layer], sorted(column, reverse=True)[:3])
        np.testing.assert_allclose([column[e] for e in experts[layer]], values[layer])
    assert analysis.top_experts_for_token(trace, token, n=50, events="slot")[0].shape == (3, E)
    with pytest.raises(ValueError, match="does not occur"):
        analysis.top_experts_for_token(trace, 99)


@pytest.mark.parametrize("min_count", [1, 12])
def test_top_tokens_per_expert(trace, min_count):
    layer, n = 2, 4
    ids, values = analysis.top_tokens_per_expert(trace, layer, n, min_count=min_count, events="slot")
    assert ids.shape == values.shape == (E, n)
    expected = ref.npmi(trace.experts[layer], trace.token_ids, trace.num_experts)
    occurrences = collections.Counter(int(t) for t in trace.token_ids)
    for e in range(E):
        routed = sorted((-expected[e, t], t) for t in occurrences
                        if occurrences[t] >= min_count and expected[e, t] > -1)[:n]
        np.testing.assert_allclose(values[e, :len(routed)], [-v for v, _ in routed])
        np.testing.assert_allclose([expected[e, t] for t in ids[e, :len(routed)]], values[e, :len(routed)])
        assert (ids[e, len(routed):] == -1).all() and (values[e, len(routed):] == -1).all()
    assert (ids[ids >= 0] != -1).all()


def test_one_expert_takes_everything():
    t = random_trace()
    t.experts[1, :, 0], t.experts[1, :, 1] = 3, E + 1  # layer position 1: expert 3 and a null slot, always
    t.scores[1] = np.eye(E, dtype=np.float32)[3]
    frequency = analysis.expert_frequency(t)
    np.testing.assert_array_equal(frequency[1], np.eye(E)[3])
    max_over_mean, cv = analysis.load_imbalance(t)
    assert max_over_mean[1] == pytest.approx(E) and cv[1] == pytest.approx(math.sqrt(E - 1))
    assert analysis.router_entropy(t)[1] == pytest.approx(0.0)
    t.scores[1] = 1.0 / E
    assert analysis.router_entropy(t)[1] == pytest.approx(math.log(E))
    np.testing.assert_allclose(locality_coverage.segment_cache_coverage(t, [1, 4, 50], [1])[1], 1.0)
    np.testing.assert_allclose(locality.segment_routing_performance(t, [1, 4, 50])[1], 1.0)
    affinity = analysis.inter_layer_affinity(t)
    np.testing.assert_allclose(affinity[0][:, 3], affinity[0].sum(-1))  # every row goes to expert 3
    np.testing.assert_allclose(analysis.coactivation(t)[0][1], 0.0)  # one expert per token: no pair
    summary = trace_report.summary(t)
    assert summary["max_expert_fraction"][1] == 1.0 and summary["experts_per_token"][1] == 1.0
    assert summary["null_slot_fraction"][1] == 0.5


def test_null_slots_are_ignored(trace):
    """A third slot column of null ids (E and beyond) changes nothing but the slot count."""
    padded = Trace(experts=np.concatenate([trace.experts, np.full((3, 200, 1), E + 5, np.int32)], axis=2),
                   weights=np.concatenate([trace.weights, np.ones((3, 200, 1), np.float32)], axis=2),
                   scores=trace.scores, token_ids=trace.token_ids, layers=trace.layers, num_experts=E,
                   doc_starts=trace.doc_starts)
    for f in (analysis.expert_frequency, analysis.gate_mass, lambda t: analysis.coactivation(t)[0],
              analysis.inter_layer_affinity, lambda t: locality_coverage.segment_cache_coverage(t, [1, 5], [1, 3]),
              lambda t: locality.segment_routing_performance(t, [1, 5]), lambda t: analysis.npmi(t, 0),
              lambda t: analysis.top_tokens_per_expert(t, 0, 3)[1]):
        np.testing.assert_allclose(f(padded), f(trace))


def test_summary(trace):
    summary = trace_report.summary(trace, lengths=[1, 4, 80])
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    assert summary["num_tokens"] == 200 and summary["num_documents"] == 4 and summary["layers"] == [1, 3, 5]
    assert summary["cache_sizes"] == [K, 2 * K] and summary["segment_lengths"] == [1, 4, 80]
    np.testing.assert_allclose(summary["router_entropy"], analysis.router_entropy(trace))
    assert summary["router_entropy_max"] == pytest.approx(math.log(E))
    np.testing.assert_allclose(np.array(summary["srp_coverage"], float)[:, :2],
                               locality_coverage.segment_routing_coverage(trace, [1, 4]))
    np.testing.assert_allclose(np.array(summary["srp"], float)[:, :2],
                               locality.segment_routing_performance(trace, [1, 4]))
    assert summary["srp_mean"][0] == pytest.approx(1.0) and summary["srp_mean"][2] is None
    assert np.array(summary["sch"], dtype=object).shape == (3, 3, 2)
    counts, _ = naive_counts(trace)
    np.testing.assert_allclose(summary["experts_per_token"], counts.sum(1) / 200)
    affinity = naive_affinity(trace)
    assert summary["affinity_top1"][0] == pytest.approx(affinity[0].max(-1)[affinity[0].sum(-1) > 0].mean())
    assert trace_report.summary(random_trace(with_scores=False), lengths=[2])["router_entropy"] is None


def test_plots_return_figures_and_write_pngs(tmp_path):
    from matplotlib.figure import Figure  # built without pyplot: savefig renders the PNG with Agg

    deep = random_trace(seed=3, layers=6)
    fig = trace_report.plot_frequency(deep, tmp_path / "frequency.png")
    assert isinstance(fig, Figure) and (tmp_path / "frequency.png").stat().st_size > 0
    np.testing.assert_allclose(np.asarray(fig.axes[0].images[0].get_array()), analysis.expert_frequency(deep))
    fig = trace_report.plot_affinity(deep, path=tmp_path / "affinity.png")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 4 and (tmp_path / "affinity.png").exists()  # 5 consecutive pairs, capped at 4 panels
    np.testing.assert_allclose(np.asarray(panels[-1].images[0].get_array()), analysis.inter_layer_affinity(deep)[4])
    assert len([ax for ax in trace_report.plot_affinity(deep, pairs=[2]).axes if ax.images]) == 1
    with pytest.raises(ValueError, match="at least two MoE layers"):
        trace_report.plot_affinity(random_trace(layers=1))
    fig = trace_report.plot_local_consistency(deep, lengths=[1, 2, 4, 80], path=tmp_path / "lrc.png")
    srp_axis, sch_axis = fig.axes[:2]
    assert [line.get_label() for line in sch_axis.get_lines()][2:] == [
        "coverage: best fixed 2 experts, layer mean", "coverage: best fixed 4 experts, layer mean"]
    np.testing.assert_allclose(srp_axis.get_lines()[1].get_ydata()[:3],
                               locality_coverage.segment_routing_coverage(deep, [1, 2, 4]).mean(0))
    assert (tmp_path / "lrc.png").exists()
