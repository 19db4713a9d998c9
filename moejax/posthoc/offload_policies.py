"""The expert caches of ``moejax.posthoc.offload``: the replacement policies and the token-by-token engine that
drives them over a routing trace. Pure Python over lists (the per-step work is a handful of set operations on at
most E keys, where numpy's per-call overhead would dominate); ``offload`` prepares the inputs and reads the counts.

Keys: the expert e of MoE layer position l is key ``l * E + e``. A cache holds keys: with per-layer caches, cache l
holds layer l's keys (``capacity`` each); with a global cache, one cache holds all layers' keys (``capacity * L``).

Each step (token t, layer l), in this order:

1. the demand: S, the token's distinct experts at layer l (null slots dropped), in slot order. A key of S found in
   the cache is a hit, any other a miss that loads it (a whole expert, or a low-precision copy: see below). The
   policy sees every key of S touched (hits and loads alike), in slot order. Then, while the cache holds more than
   its capacity, the policy's victim among the resident keys not in S is evicted: the token's experts at this layer
   are resident together (a layer's experts of one token run at once), so a capacity below top_k is refused.
2. the prefetch (when asked): the predicted experts P of layer l + 1 for this token are loaded (full precision)
   where not resident, then the cache is brought back to capacity by evicting victims outside P. A prefetched key
   counts as useful when a demand access finds it before it is evicted, as useless otherwise.

Policies (``POLICIES``), each ranking the resident keys by a priority and evicting the lowest; ties go to the key
touched least recently (every touch, demand or load, takes the next value of one clock, so no two keys tie):

* ``lru``: priority = the last touch (least recently used);
* ``lfu``: priority = the key's number of demand accesses since the reset (kept across evictions: "perfect" LFU),
  aged by ``decay`` per token: c <- decay * c + [accessed] (decay = 1: plain counts);
* ``score``: priority = the accumulated gate weight of the key's demand accesses (``score_source='weight'``) or the
  accumulated router score of the expert over every token of its layer, selected or not (``'score'``: needs the
  trace's scores), aged by ``decay`` like ``lfu``;
* ``belady``: offline MIN (Belady 1966): evict the key whose next demand access lies farthest in the future (the
  trace is known in advance): a bound that no online policy can beat, without prefetching, in misses.

Aging is exact without touching every key per token: the increments grow by 1 / decay per token and the stored
values are scaled down together when the increment passes 1e100 (order unchanged).

Low precision (HOBBIT, arXiv 2411.01433): with ``low_threshold`` > 0, a miss whose gate weight is below it loads a
low-precision copy (``low_units`` of an expert's bytes); it serves later accesses below the threshold, and an access
at or above it finds it a miss (the full copy is loaded in its place). A low-precision copy takes a whole slot.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np

POLICIES = ("lru", "lfu", "score", "belady")
ONLINE_POLICIES = ("lru", "lfu", "score")
SCORE_SOURCES = ("weight", "score")
_RESCALE = 1e100  # the aging increment at which stored values are scaled down
BLOCK = 4096  # tokens read from the trace's arrays at a time


class _Policy:
    """Priority bookkeeping over keys; ``victims`` returns the m resident candidates of lowest priority."""

    def __init__(self, num_keys: int):
        self.num_keys = num_keys
        self.reset()

    def reset(self) -> None:
        self.last = [0] * self.num_keys

    def tick(self, t: int) -> None:
        """A new token t (all layers)."""

    def touched(self, key: int, clock: int, weight: float, step: int) -> None:
        """A demand access of key at ``step`` (token t * L + layer l) with the slot's gate weight."""
        self.last[key] = clock

    def loaded(self, key: int, clock: int, step: int) -> None:
        """key was loaded (by a demand miss or a prefetch) at ``step``."""
        self.last[key] = clock

    def victims(self, candidates: list[int], m: int) -> list[int]:
        return heapq.nsmallest(m, candidates, key=self.last.__getitem__)


class LRU(_Policy):
    pass


class _Aged(_Policy):
    """A value per key, accumulated with aging ``decay`` per token; ties by the last touch."""

    def __init__(self, num_keys: int, decay: float):
        self.decay = float(decay)
        super().__init__(num_keys)

    def reset(self) -> None:
        super().reset()
        self.value = [0.0] * self.num_keys
        self.increment = 1.0

    def tick(self, t: int) -> None:
        if self.decay != 1.0:
            self.increment /= self.decay
            if self.increment > _RESCALE:
                scale = 1.0 / self.increment
                self.value = self.value * scale if isinstance(self.value, np.ndarray) else [
                    v * scale for v in self.value]
                self.increment = 1.0

    def victims(self, candidates: list[int], m: int) -> list[int]:
        value, last = self.value, self.last
        return heapq.nsmallest(m, candidates, key=lambda k: (value[k], last[k]))


class LFU(_Aged):
    def touched(self, key: int, clock: int, weight: float, step: int) -> None:
        self.last[key] = clock
        self.value[key] += self.increment


class Score(_Aged):
    """score_source 'weight': the gate weight of each access; 'score': ``observe`` adds, at each step, the router
    scores of every expert of the layer (``scores[l, t]``, an [L, N, E] array)."""

    def __init__(self, num_keys: int, decay: float, num_experts: int, scores: np.ndarray | None = None):
        self.num_experts = num_experts
        self.scores = scores
        super().__init__(num_keys, decay)

    def reset(self) -> None:
        super().reset()
        if self.scores is not None:
            self.value = np.zeros(self.num_keys)

    def touched(self, key: int, clock: int, weight: float, step: int) -> None:
        self.last[key] = clock
        if self.scores is None:
            self.value[key] += self.increment * weight

    def observe(self, layer: int, t: int) -> None:
        base = layer * self.num_experts
        self.value[base:base + self.num_experts] += self.increment * np.asarray(self.scores[layer, t], np.float64)


class Belady(_Policy):
    """Offline MIN: ``occurrences[key]`` is the sorted int array of the tokens at which key is demanded; a key's
    priority is minus its next demand step (token * L + layer) after its last touch (never again: -inf)."""

    def __init__(self, num_keys: int, num_layers: int, num_experts: int, occurrences: list[np.ndarray]):
        self.num_layers, self.num_experts, self.occurrences = num_layers, num_experts, occurrences
        super().__init__(num_keys)

    def reset(self) -> None:
        super().reset()
        self.next = [0.0] * self.num_keys

    def _next_after(self, key: int, step: int) -> float:
        layer = key // self.num_experts
        tokens = self.occurrences[key]
        i = int(tokens.searchsorted((step - layer) // self.num_layers + 1))
        return int(tokens[i]) * self.num_layers + layer if i < len(tokens) else float("inf")

    def touched(self, key: int, clock: int, weight: float, step: int) -> None:
        self.last[key] = clock
        self.next[key] = -self._next_after(key, step)

    def loaded(self, key: int, clock: int, step: int) -> None:
        self.last[key] = clock
        if key // self.num_experts != step % self.num_layers:  # a prefetch (a demand load is touched next)
            self.next[key] = -self._next_after(key, step)

    def victims(self, candidates: list[int], m: int) -> list[int]:
        nxt, last = self.next, self.last
        return heapq.nsmallest(m, candidates, key=lambda k: (nxt[k], last[k]))


def make_policy(name: str, num_layers: int, num_experts: int, *, decay: float = 1.0, scores: np.ndarray | None = None,
                occurrences: list[np.ndarray] | None = None) -> _Policy:
    """The policy ``name`` over L * E keys (``scores``: the router scores [L, N, E] for ``score`` with score_source
    'score'; ``occurrences``: per key the sorted tokens demanding it, for ``belady``: ``occurrences``)."""
    keys = num_layers * num_experts
    if name == "lru":
        return LRU(keys)
    if name == "lfu":
        return LFU(keys, decay)
    if name == "score":
        return Score(keys, decay, num_experts, scores)
    if name == "belady":
        return Belady(keys, num_layers, num_experts, occurrences)
    raise ValueError(f"unknown policy {name!r}: allowed are {', '.join(POLICIES)}")


def clean(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[..., k] int64 with -1 for ids outside [0, E) (null slots) and for repeats of an earlier slot's id."""
    out = np.where((experts >= 0) & (experts < num_experts), experts, -1).astype(np.int64)
    for j in range(1, out.shape[-1]):
        repeat = (out[..., j:j + 1] == out[..., :j]).any(-1)
        out[..., j] = np.where(repeat, -1, out[..., j])
    return out


def occurrences(experts: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """Per key l * E + e, the sorted tokens (int64) at which expert e is demanded at layer l (experts [L, N, k] as
    the trace holds them), for ``Belady``."""
    num_layers, num_tokens, k = experts.shape
    out = []
    for layer in range(num_layers):
        flat = clean(np.asarray(experts[layer]), num_experts).reshape(-1)
        tokens = np.repeat(np.arange(num_tokens, dtype=np.int64), k)
        valid = flat >= 0
        order = np.argsort(flat[valid], kind="stable")
        ids, toks = flat[valid][order], tokens[valid][order]
        bounds = np.searchsorted(ids, np.arange(num_experts + 1))
        out.extend(np.unique(toks[bounds[e]:bounds[e + 1]]) for e in range(num_experts))
    return out


def run(experts: np.ndarray, weights: np.ndarray, segments: Sequence[tuple[int, int]], num_experts: int,
        capacity: int, policy: _Policy, *, global_cache: bool = False, prefetch: np.ndarray | None = None,
        low_threshold: float = 0.0, low_units: float = 1.0, progress: Callable[[int], None] | None = None) -> dict:
    """Simulates the caches over the tokens of ``segments`` ([start, end) each; every cache and the policy start
    empty at each segment's start). experts [L, N, k]: the selected experts as the trace holds them (null slots and
    repeats within a token's slots skipped: ``clean``); weights [L, N, k]: their gate weights; prefetch [L, N, p]:
    the experts of layer l + 1 to prefetch after layer l (-1: none; None: no prefetching). The arrays are read a
    block of tokens at a time. ``progress(tokens done)`` every ``BLOCK`` tokens or so and at the end.

    Returns per layer (lists of L) 'accesses', 'hits', 'compulsory' (first demand of a key since the reset),
    'low_slots' (accesses served by a low-precision copy), 'prefetch_loads', 'prefetch_useful' (by the layer the
    prefetch was for), and per step 'demand' and 'prefetched' [L][n] (experts moved, a low-precision copy counting
    low_units; 'prefetched' by the step that issued them) and 'active' [L][n] (distinct experts demanded), n the
    tokens of all segments in order."""
    num_layers = experts.shape[0]
    observe = policy.observe if getattr(policy, "scores", None) is not None else None
    accesses, hits, compulsory, low_slots = ([0] * num_layers for _ in range(4))
    prefetch_loads, prefetch_useful = [0] * num_layers, [0] * num_layers
    demand = [[] for _ in range(num_layers)]
    prefetched = [[] for _ in range(num_layers)]
    active = [[] for _ in range(num_layers)]
    cache_of = [0] * num_layers if global_cache else list(range(num_layers))
    limit = capacity * num_layers if global_cache else capacity
    low_on = low_threshold > 0
    clock, done, reported = 0, 0, 0
    total = sum(end - start for start, end in segments)
    for start, end in segments:
        policy.reset()
        caches = [set() for _ in range(max(cache_of) + 1)]
        low: set[int] = set()  # resident keys held in low precision
        pending: set[int] = set()  # prefetched keys not yet demanded
        seen: set[int] = set()
        for block in range(start, end, BLOCK):
            block_end = min(block + BLOCK, end)
            ex = clean(np.asarray(experts[:, block:block_end]), num_experts).tolist()
            wt = np.asarray(weights[:, block:block_end], np.float64).tolist()
            pre = None if prefetch is None else prefetch[:, block:block_end].tolist()
            for i in range(block_end - block):
                t = block + i
                policy.tick(t)
                for layer in range(num_layers):
                    step = t * num_layers + layer
                    base = layer * num_experts
                    cache = caches[cache_of[layer]]
                    if observe is not None:
                        observe(layer, t)
                    moved = 0.0
                    n_hit = n_low = 0
                    keys = []
                    for e, w in zip(ex[layer][i], wt[layer][i], strict=True):
                        if e < 0:
                            continue
                        key = base + e
                        keys.append(key)
                        clock += 1
                        cheap = low_on and w < low_threshold
                        if key in cache:
                            if key in low and not cheap:  # a low-precision copy where the full one is needed
                                low.discard(key)
                                moved += 1.0
                            else:
                                n_hit += 1
                                n_low += key in low
                            if key in pending:
                                pending.discard(key)
                                prefetch_useful[layer] += 1
                            policy.touched(key, clock, w, step)
                            continue
                        if key not in seen:
                            seen.add(key)
                            compulsory[layer] += 1
                        cache.add(key)
                        if cheap:
                            low.add(key)
                            moved += low_units
                            n_low += 1
                        else:
                            moved += 1.0
                        policy.loaded(key, clock, step)
                        policy.touched(key, clock, w, step)
                    over = len(cache) - limit
                    if over > 0:
                        protected = set(keys)
                        for key in policy.victims([k for k in cache if k not in protected], over):
                            cache.discard(key)
                            low.discard(key)
                            pending.discard(key)
                    accesses[layer] += len(keys)
                    hits[layer] += n_hit
                    low_slots[layer] += n_low
                    demand[layer].append(moved)
                    active[layer].append(len(keys))
                    loads = 0
                    if pre is not None and layer + 1 < num_layers:
                        target = caches[cache_of[layer + 1]]
                        nbase = base + num_experts
                        wanted = [nbase + e for e in pre[layer][i] if e >= 0]
                        for key in wanted:
                            if key not in target:
                                clock += 1
                                target.add(key)
                                pending.add(key)
                                policy.loaded(key, clock, step)
                                loads += 1
                        over = len(target) - limit
                        if over > 0:
                            protected = set(wanted)
                            for key in policy.victims([k for k in target if k not in protected], over):
                                target.discard(key)
                                low.discard(key)
                                pending.discard(key)
                        prefetch_loads[layer + 1] += loads
                    prefetched[layer].append(float(loads))
            done += block_end - block
            if progress is not None and (done - reported >= BLOCK or done == total):
                progress(done)
                reported = done
    return {"accesses": accesses, "hits": hits, "compulsory": compulsory, "low_slots": low_slots,
            "prefetch_loads": prefetch_loads, "prefetch_useful": prefetch_useful, "demand": demand,
            "prefetched": prefetched, "active": active}
