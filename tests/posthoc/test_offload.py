"""The expert-offloading simulator (moejax/posthoc/offload.py, offload_policies.py) and ``python -m moejax.posthoc
offload``.

Every policy, prefetcher, stream and cache option is checked against ``brute_force``: the same rules re-simulated
token by token over plain Python lists and dicts (resident lists scanned for the victim, values decayed by
multiplying every entry per token, Belady's next use found by scanning the trace forward). Beside it: LRU against a
textbook ``OrderedDict`` LRU, a cache of all E experts missing only once per expert, Belady's MIN never beaten by an
online policy, the oracle prefetch never worse than none, and the costs against hand-computed cases.
"""
import collections
import json
import math

import numpy as np
import pytest

from moejax.posthoc import analysis, offload
from moejax.posthoc.trace import Trace, write_trace


def random_trace(layers=3, tokens=150, num_experts=8, top_k=2, seed=0, docs=4, scores=False, skew=0.5):
    """Skewed routing with some null slots (id E) and repeated ids within a token, random weights and documents."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(num_experts + 1) * skew, size=layers)
    experts = np.stack([rng.choice(num_experts + 1, size=(tokens, top_k), p=row) for row in p]).astype(np.int32)
    starts = rng.choice(np.arange(1, tokens), size=docs - 1, replace=False) if docs > 1 else []
    return Trace(experts=experts, weights=rng.random(experts.shape).astype(np.float32),
                 scores=rng.dirichlet(np.ones(num_experts), size=(layers, tokens)).astype(np.float32) if scores
                 else None, token_ids=rng.integers(0, 64, tokens), layers=list(range(layers)),
                 num_experts=num_experts, doc_starts=starts)


# ------------------------------------------------------------------------------------------ the reference

def demanded(trace, layer, t):
    """[(expert, gate weight)]: the token's distinct valid experts in slot order."""
    out = []
    for j in range(trace.top_k):
        e = int(trace.experts[layer, t, j])
        if 0 <= e < trace.num_experts and e not in [x for x, _ in out]:
            out.append((e, float(trace.weights[layer, t, j])))
    return out


def first_valid(row, num_experts, p):
    out = []
    for e in row:
        if 0 <= int(e) < num_experts and int(e) not in out:
            out.append(int(e))
    return out[:p]


def brute_force(trace, policy, capacity, *, prefetch=None, stream="document", global_cache=False, decay=1.0,
                score_source="weight", low_threshold=0.0, low_units=1.0):
    """The simulator's rules re-done slowly. prefetch[l][t]: experts of layer l + 1 to load after layer l."""
    num_layers, num_tokens, num_experts = trace.num_layers, trace.num_tokens, trace.num_experts
    wanted = [[demanded(trace, layer, t) for t in range(num_tokens)] for layer in range(num_layers)]

    def next_use(layer, e, start):
        for u in range(start, num_tokens):
            if e in [x for x, _ in wanted[layer][u]]:
                return u * num_layers + layer
        return math.inf

    limit = capacity * num_layers if global_cache else capacity
    counts = {name: [0] * num_layers for name in ("accesses", "hits", "compulsory", "low_slots", "prefetch_loads",
                                                 "prefetch_useful")}
    demand = np.zeros((num_layers, num_tokens))
    prefetched = np.zeros((num_layers, num_tokens))
    active = np.zeros((num_layers, num_tokens))
    documents = trace.documents.tolist() if stream == "document" else [[0, num_tokens]]
    def priority(state, key):
        if policy == "lru":
            return (state["last"][key],)
        if policy in ("lfu", "score"):
            return (state["value"].get(key, 0.0), state["last"][key])
        return (-state["upcoming"][key], state["last"][key])

    def shrink(state, cache, protected):
        while len(cache) > limit:
            victim = min((key for key in cache if key not in protected), key=lambda key: priority(state, key))
            cache.remove(victim)
            state["low"].discard(victim)
            state["pending"].discard(victim)

    for a, b in documents:
        caches = {c: [] for c in range(num_layers)}
        state = {"low": set(), "pending": set(), "last": {}, "value": {}, "upcoming": {}}
        low, pending, last, value, upcoming = (state[name] for name in ("low", "pending", "last", "value", "upcoming"))
        seen, clock = set(), 0
        for t in range(a, b):
            for key in value:
                value[key] *= decay
            for layer in range(num_layers):
                cache = caches[0 if global_cache else layer]
                if policy == "score" and score_source == "score":
                    for e in range(num_experts):
                        value[(layer, e)] = value.get((layer, e), 0.0) + float(trace.scores[layer, t, e])
                moved = 0.0
                for e, w in wanted[layer][t]:
                    key = (layer, e)
                    clock += 1
                    cheap = low_threshold > 0 and w < low_threshold
                    counts["accesses"][layer] += 1
                    if key in cache:
                        if key in low and not cheap:
                            low.remove(key)
                            moved += 1
                        else:
                            counts["hits"][layer] += 1
                            counts["low_slots"][layer] += key in low
                        if key in pending:
                            pending.remove(key)
                            counts["prefetch_useful"][layer] += 1
                    else:
                        if key not in seen:
                            seen.add(key)
                            counts["compulsory"][layer] += 1
                        cache.append(key)
                        if cheap:
                            low.add(key)
                            moved += low_units
                            counts["low_slots"][layer] += 1
                        else:
                            moved += 1
                    last[key] = clock
                    if policy == "lfu":
                        value[key] = value.get(key, 0.0) + 1
                    if policy == "score" and score_source == "weight":
                        value[key] = value.get(key, 0.0) + w
                    if policy == "belady":
                        upcoming[key] = next_use(layer, e, t + 1)
                shrink(state, cache, {(layer, e) for e, _ in wanted[layer][t]})
                demand[layer, t] = moved
                active[layer, t] = len(wanted[layer][t])
                if prefetch is not None and layer + 1 < num_layers:
                    target = caches[0 if global_cache else layer + 1]
                    loads = 0
                    for e in prefetch[layer][t]:
                        key = (layer + 1, e)
                        if key not in target:
                            clock += 1
                            target.append(key)
                            pending.add(key)
                            last[key] = clock
                            upcoming[key] = next_use(layer + 1, e, t)
                            loads += 1
                    shrink(state, target, {(layer + 1, e) for e in prefetch[layer][t]})
                    counts["prefetch_loads"][layer + 1] += loads
                    prefetched[layer, t] = loads
    return counts, demand, prefetched, active


def reference_prefetch(trace, kind, p, predictions=None, affinity=None):
    """prefetch[l][t] for brute_force, computed directly."""
    num_layers, num_tokens, num_experts = trace.num_layers, trace.num_tokens, trace.num_experts
    out = [[[] for _ in range(num_tokens)] for _ in range(num_layers)]
    for layer in range(num_layers - 1):
        for t in range(num_tokens):
            if kind == "oracle":
                out[layer][t] = first_valid(trace.experts[layer + 1, t], num_experts, p)
            elif kind == "pregated":
                out[layer][t] = first_valid(predictions[layer, t], num_experts, p)
            else:
                score = [sum(affinity[layer, i, j] for i, _ in demanded(trace, layer, t)) for j in range(num_experts)]
                best = sorted(range(num_experts), key=lambda j: (-score[j], j))[:p]
                out[layer][t] = [j for j in best if score[j] > 0]
    return out


def assert_same(result, expected):
    counts, demand, prefetched, active = expected
    for name, values in counts.items():
        assert getattr(result, name).tolist() == values, name
    np.testing.assert_allclose(result.demand, demand, rtol=1e-6)
    np.testing.assert_array_equal(result.prefetched, prefetched)
    np.testing.assert_array_equal(result.active, active)


# ------------------------------------------------------------------------------------------------- policies

CASES = {  # name: (simulate's keyword arguments, brute_force's)
    "document": ({}, {}),
    "corpus": ({"stream": "corpus"}, {"stream": "corpus"}),
    "global": ({"global_cache": True}, {"global_cache": True}),
    "decay": ({"decay": 0.5}, {"decay": 0.5}),
    "low_precision": ({"low_precision_threshold": 0.4, "low_precision_bits": 4},
                      {"low_threshold": 0.4, "low_units": 0.25}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("policy", offload.POLICIES)
def test_every_policy_matches_the_brute_force_simulation(policy, case):
    ours, theirs = CASES[case]
    for seed, (top_k, capacity) in enumerate([(2, 3), (3, 5)]):
        trace = random_trace(tokens=120, top_k=top_k, seed=seed, docs=5)
        result = offload.simulate(trace, policy, capacity, **ours)
        assert_same(result, brute_force(trace, policy, capacity, **theirs))


def test_score_policy_with_router_scores_matches_the_brute_force_simulation():
    trace = random_trace(tokens=100, scores=True, seed=3)
    for capacity in (2, 4):
        result = offload.simulate(trace, "score", capacity, score_source="score", stream="corpus")
        assert_same(result, brute_force(trace, "score", capacity, score_source="score", stream="corpus"))


@pytest.mark.parametrize("policy", ["lfu", "score"])
def test_aging_over_a_long_stream_matches_the_brute_force_simulation(policy):
    """Past 333 tokens at decay 0.5 the stored values are rescaled (increment > 1e100); scaling by powers of two
    keeps them exactly 2^t times the brute force's, so the evictions agree exactly."""
    trace = random_trace(tokens=800, seed=5, docs=1)
    result = offload.simulate(trace, policy, 3, stream="corpus", decay=0.5)
    assert_same(result, brute_force(trace, policy, 3, stream="corpus", decay=0.5))


@pytest.mark.parametrize("kind", ["oracle", "pregated", "affinity"])
@pytest.mark.parametrize("policy", offload.POLICIES)
def test_prefetching_matches_the_brute_force_simulation(policy, kind):
    trace = random_trace(tokens=100, top_k=2, seed=7, docs=3)
    rng = np.random.default_rng(1)
    predictions = rng.integers(0, trace.num_experts + 1, (trace.num_layers - 1, trace.num_tokens, 3))
    affinity = analysis.inter_layer_affinity(random_trace(tokens=300, seed=8))  # a separate calibration trace
    for p, capacity, global_cache in [(2, 3, False), (1, 2, False), (3, 4, True)]:
        result = offload.simulate(trace, policy, capacity, prefetch=kind, prefetch_experts=p, predictions=predictions,
                                  affinity=affinity, global_cache=global_cache)
        plan = reference_prefetch(trace, kind, p, predictions, affinity)
        assert_same(result, brute_force(trace, policy, capacity, prefetch=plan, global_cache=global_cache))


def test_lru_matches_a_textbook_lru():
    for seed in range(6):
        top_k = 1 + seed % 3
        trace = random_trace(tokens=200, top_k=top_k, seed=seed, docs=1)
        for capacity in range(top_k, trace.num_experts + 1):
            result = offload.simulate(trace, "lru", capacity, stream="corpus")
            for layer in range(trace.num_layers):
                cache, hits, textbook_hits = collections.OrderedDict(), 0, 0
                single = collections.OrderedDict()  # top-1: the plain one-access-at-a-time LRU
                for t in range(trace.num_tokens):
                    wanted = [e for e, _ in demanded(trace, layer, t)]
                    for e in wanted:
                        if e in cache:
                            cache.move_to_end(e)
                            hits += 1
                        else:
                            cache[e] = None
                    while len(cache) > capacity:
                        cache.popitem(last=False)
                    for e in wanted if top_k == 1 else ():
                        if e in single:
                            single.move_to_end(e)
                            textbook_hits += 1
                        else:
                            single[e] = None
                            if len(single) > capacity:
                                single.popitem(last=False)
                assert result.hits[layer] == hits
                if top_k == 1:
                    assert hits == textbook_hits


@pytest.mark.parametrize("global_cache", [False, True])
def test_a_cache_of_every_expert_misses_each_expert_once(global_cache):
    trace = random_trace(tokens=200, top_k=3, seed=4, docs=4)
    for policy in offload.POLICIES:
        for stream in offload.STREAMS:
            result = offload.simulate(trace, policy, trace.num_experts, stream=stream, global_cache=global_cache)
            summary = offload.summary(result)
            assert summary["warm_hit_rate"] == 1.0
            assert (result.accesses - result.hits).tolist() == result.compulsory.tolist()
            documents = trace.documents if stream == "document" else [(0, trace.num_tokens)]
            for layer in range(trace.num_layers):
                distinct = sum(len({e for t in range(a, b) for e, _ in demanded(trace, layer, t)})
                               for a, b in documents)
                assert result.compulsory[layer] == distinct


@pytest.mark.parametrize("global_cache", [False, True])
def test_belady_is_never_beaten_by_an_online_policy(global_cache):
    for seed in range(4):
        trace = random_trace(tokens=200, top_k=2 + seed % 2, seed=10 + seed, docs=2, scores=True)
        for capacity in range(trace.top_k, trace.num_experts):
            best = offload.simulate(trace, "belady", capacity, global_cache=global_cache)
            for policy, extra in [("lru", {}), ("lfu", {}), ("lfu", {"decay": 0.8}), ("score", {}),
                                  ("score", {"score_source": "score"})]:
                other = offload.simulate(trace, policy, capacity, global_cache=global_cache, **extra)
                assert best.hits.sum() >= other.hits.sum(), (policy, extra, capacity)
                if not global_cache:
                    assert (best.hits >= other.hits).all(), (policy, extra, capacity)


def test_the_oracle_prefetch_is_never_worse_than_none():
    for seed in range(4):
        trace = random_trace(tokens=150, top_k=2 + seed % 2, seed=20 + seed, docs=3)
        for policy in offload.POLICIES:
            for capacity in range(trace.top_k, trace.num_experts + 1):
                for global_cache in (False, True):
                    plain = offload.simulate(trace, policy, capacity, global_cache=global_cache)
                    oracle = offload.simulate(trace, policy, capacity, prefetch="oracle", global_cache=global_cache)
                    assert (oracle.hits >= plain.hits).all()
                    # it moves the experts the demand would have moved, one layer earlier
                    assert oracle.demand.sum() + oracle.prefetched.sum() == plain.demand.sum()
                    assert (oracle.prefetch_loads == oracle.prefetch_useful).all()


# ---------------------------------------------------------------------------------------------------- costs

def hand_trace():
    """Layer 0 routes experts 0, 1, 0 and layer 1 experts 2, 2, 3 (top-1, E = 4, one document)."""
    experts = np.array([[[0], [1], [0]], [[2], [2], [3]]], np.int32)
    weights = np.array([[[0.9], [0.2], [0.3]], [[0.1], [0.8], [0.7]]], np.float32)
    return Trace(experts=experts, weights=weights, token_ids=np.zeros(3, np.int32), layers=[0, 1], num_experts=4)


def test_bytes_and_latency_against_hand_computed_cases():
    device = offload.Device("toy", host_bandwidth_gbs=1.0, memory_gb=1.0, tflops=1.0)
    costs = offload.Costs(device, expert_bytes=1e6)  # transfer 1 ms, compute 2 * 1e6 * 8 / 16 FLOPs = 1 us
    assert costs.flops == 1e6 and costs.transfer_s == pytest.approx(1e-3) and costs.compute_s == pytest.approx(1e-6)
    result = offload.simulate(hand_trace(), "lru", 1)  # layer 0: miss miss miss; layer 1: miss hit miss
    s = offload.summary(result, costs)
    assert s["hit_rate"] == [0.0, pytest.approx(1 / 3)] and s["hit_rate_overall"] == pytest.approx(1 / 6)
    assert s["bytes_moved_per_token"] == pytest.approx(5e6 / 3)
    # overlap: per step max(1 us, transfer); token 0: 1 ms + 1 ms, token 1: 1 ms + 1 us, token 2: 1 ms + 1 ms
    assert s["latency"]["mean_s"] == pytest.approx((5e-3 + 1e-6) / 3)
    assert s["latency_resident"]["mean_s"] == pytest.approx(2e-6)
    assert s["latency_no_cache"]["mean_s"] == pytest.approx(2e-3)
    serial = offload.summary(result, dataclass_replace(costs, overlap=False))
    assert serial["latency"]["mean_s"] == pytest.approx((5e-3 + 6e-6) / 3)
    assert s["cache_bytes"] == 2e6 and s["fits_device_memory"]
    # memory bound: 1e6 bytes at 100 GB/s = 10 us > 1 us of FLOPs
    slow = offload.Costs(offload.Device("toy", 1.0, 1.0, 1.0, hbm_bandwidth_gbs=100.0), expert_bytes=1e6)
    assert slow.compute_s == pytest.approx(1e-5)
    # low precision: a miss of gate weight below 0.5 loads a 4-bit copy (a quarter of the bytes). Layer 0 loads
    # expert 0 fully (0.9), then 1 and 0 (evicted meanwhile) in low precision (0.2, 0.3); layer 1 loads 2 in low
    # precision (0.1), then fully (0.8 >= 0.5: a miss), then 3 fully
    low = offload.summary(offload.simulate(hand_trace(), "lru", 1, low_precision_threshold=0.5), costs)
    assert low["demand_experts_per_token"] == pytest.approx((1 + 0.25 + 0.25 + 0.25 + 1 + 1) / 3)
    assert low["low_precision_slots"] == [2, 1] and low["hit_rate"] == [0.0, 0.0]
    # prefetching adds its transfers to the issuing step: the oracle moves 2 at layer 0 (2 then 3), none at layer 1
    oracle = offload.simulate(hand_trace(), "lru", 1, prefetch="oracle")
    assert oracle.prefetched.tolist() == [[1, 0, 1], [0, 0, 0]] and oracle.hits.tolist() == [0, 3]
    s = offload.summary(oracle, costs)
    assert s["latency"]["mean_s"] == pytest.approx((2e-3 + 1e-3 + 1e-6 + 2e-3) / 3 + 2e-6 / 3)


def dataclass_replace(value, **changes):
    import dataclasses

    return dataclasses.replace(value, **changes)


def test_expert_size_from_the_model_config():
    from moejax.configs import base

    config = base.get_config()
    config.model.d_model, config.model.moe.expert_ffn = 64, 48
    assert offload.expert_size(config.model) == (3 * 64 * 48 * 2, 2.0 * 3 * 64 * 48)
    assert offload.expert_size(config.model, bits=8)[0] == 3 * 64 * 48
    config.model.moe.expert_kind = "gpt_oss"  # biases: 2 F + D more
    assert offload.expert_size(config.model)[0] == (3 * 64 * 48 + 2 * 48 + 64) * 2


def test_device_specs():
    for name, device in offload.DEVICES.items():
        assert offload.parse_device(name) == (device, {})
    device, extra = offload.parse_device("h100-sxm,host_bandwidth_gbs=25,expert_bytes=1e6")
    assert device.host_bandwidth_gbs == 25 and device.tflops == offload.DEVICES["h100-sxm"].tflops
    assert extra == {"expert_bytes": 1e6}
    device, extra = offload.parse_device('{"host_bandwidth_gbs": 16, "memory_gb": 8, "tflops": 10}')
    assert device == offload.Device("custom", 16, 8, 10) and extra == {}
    assert offload.parse_device({"preset": "a100-80gb", "memory_gb": 40})[0].memory_gb == 40


@pytest.mark.parametrize("spec, why", [
    ("tpu-v9", "neither a preset nor key=value"), ("{\"tflops\": 1", "cannot read the JSON"),
    ("[1, 2]", "neither a preset"), ("host_bandwidth_gbs=1,memory_gb=1", "missing tflops"),
    ("h100-sxm,tflops=-3", "tflops='-3' must be a number > 0"), ("h100-sxm,speed=3", "unknown keys \\['speed'\\]"),
    ("h100-sxm,memory_gb=lots", "memory_gb='lots' must be a number"), ("missing.json", "cannot read the JSON")])
def test_malformed_device_specs_are_refused_naming_the_problem(spec, why):
    with pytest.raises(offload.ArgumentError, match=f"device=.*{why}.*") as error:
        offload.parse_device(spec)
    assert error.value.name == "device"


def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed():
    trace = random_trace(top_k=2)
    cases = [({"policy": "fifo"}, "policy='fifo': allowed are lru, lfu, score, belady"),
             ({"cache_experts": 1}, r"cache_experts=1: .* \[top_k, E\] = \[2, 8\]"),
             ({"cache_experts": 9}, r"cache_experts=9: .* \[top_k, E\] = \[2, 8\]"),
             ({"prefetch": "psychic"}, "prefetch='psychic': allowed are none, affinity, pregated, oracle"),
             ({"prefetch": "oracle", "prefetch_experts": 5, "cache_experts": 4},
              r"prefetch_experts=5: an integer in \[1, cache_experts\] = \[1, 4\]"),
             ({"stream": "batch"}, "stream='batch': allowed are document, corpus"),
             ({"decay": 0.0}, r"decay=0.0: .* \(0, 1\]"),
             ({"policy": "score", "score_source": "score"}, "score_source='score': the trace has no router scores"),
             ({"prefetch": "pregated"}, "predictions=None: prefetch='pregated' needs"),
             ({"prefetch": "pregated", "predictions": np.zeros((3, 5, 2), int)}, r"predictions=.*\[L, N, q\]"),
             ({"low_precision_bits": 32}, r"low_precision_bits=32: an integer in \[1, expert_bits\] = \[1, 16\]")]
    for kwargs, message in cases:
        with pytest.raises(offload.ArgumentError, match=message):
            offload.simulate(trace, **kwargs)
    with pytest.raises(offload.ArgumentError, match="expert_bytes=0"):
        offload.Costs(offload.DEVICES["h100-sxm"], expert_bytes=0)
    with pytest.raises(offload.ArgumentError, match=r"calibration_fraction=1.5: must be a number in \[0, 1\)"):
        offload.split_calibration(trace, 1.5)


def test_split_calibration_cuts_at_a_document_start():
    trace = random_trace(tokens=100, docs=1)
    trace = Trace(experts=trace.experts, weights=trace.weights, token_ids=trace.token_ids, layers=trace.layers,
                  num_experts=8, doc_starts=[0, 10, 30, 70])
    calibration, rest, cut = offload.split_calibration(trace, 0.2)
    assert cut == 30 and calibration.num_tokens == 30 and rest.num_tokens == 70
    assert calibration.doc_starts.tolist() == [0, 10] and rest.doc_starts.tolist() == [0, 40]
    np.testing.assert_array_equal(rest.experts, trace.experts[:, 30:])
    assert offload.split_calibration(trace, 0.0)[2] == 0


# ---------------------------------------------------------------------------------------------- command line

def test_the_command_writes_json_and_the_plot(tmp_path, capsys):
    from moejax import cli as cli_lib
    from moejax.posthoc import __main__ as cli

    trace = random_trace(tokens=400, docs=8, top_k=2)
    write_trace(trace, tmp_path / "trace")
    predictions = np.concatenate([trace.experts[1:], trace.experts[:1]])  # the next layer's actual experts
    np.save(tmp_path / "pregated.npy", predictions)
    out = tmp_path / "out"
    report = cli.main(["offload", "--trace", str(tmp_path / "trace"), "--out", str(out), "--policy", "lru,belady",
                       "--cache_experts", "2,4", "--prefetch", "none,oracle,pregated,affinity", "--predictions",
                       str(tmp_path / "pregated.npy"), "--device", "rtx-4090,expert_bytes=2e6"])
    assert json.loads((out / "offload.json").read_text()) == report
    assert (out / "hit_rate.png").stat().st_size > 0
    assert report["calibration_tokens"] > 0 and report["costs"]["expert_bytes"] == 2e6
    assert len(report["runs"]) == 2 * 2 * 4
    runs = {(r["policy"], r["cache_experts"], r["prefetch"]): r for r in report["runs"]}
    for key, run in runs.items():
        if key[2] == "pregated":  # predictions equal to the actual experts: the oracle
            assert run["hit_rate"] == runs[(key[0], key[1], "oracle")]["hit_rate"]
        assert run["num_tokens"] == trace.num_tokens - report["calibration_tokens"]
    base = ["offload", "--trace", str(tmp_path / "trace"), "--out", str(tmp_path / "bad"), "--expert_bytes", "1"]
    for flags, message in [(["--cache_experts", "1"], r"--cache_experts=1: .*\[2, 8\]"),
                           (["--cache_experts", "two"], "--cache_experts='two': comma-separated integers"),
                           (["--policy", "lru,mru"], "--policy='lru,mru': comma-separated, allowed are"),
                           (["--device", "abacus"], "--device='abacus': 'abacus' is neither a preset"),
                           (["--prefetch", "pregated"], "--predictions='': --prefetch=pregated needs")]:
        with pytest.raises(cli_lib.UsageError, match=message):
            cli.main(base + flags)
    with pytest.raises(cli_lib.UsageError, match="--expert_bytes=0.0: the bytes of one expert are unknown"):
        cli.main(base[:-2])
    assert not (tmp_path / "bad").exists()
    # the expert's size from a moejax workdir's config.json: a GLU expert of D x F = 64 x 48 at 8 bits
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": {"d_model": 64, "moe": {"expert_ffn": 48}}}))
    report = cli.main(base[:-2] + ["--checkpoint", str(tmp_path / "run"), "--expert_bits", "8", "--policy", "lru",
                                   "--cache_experts", "4", "--first_tokens", "50", "--no_overlap"])
    assert report["costs"]["expert_bytes"] == 3 * 64 * 48 and report["costs"]["expert_flops"] == 2 * 3 * 64 * 48
    assert not report["costs"]["overlap"] and report["num_tokens"] == 50
