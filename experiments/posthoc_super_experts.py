"""The super-expert ablation of experiments/posthoc_compression.py (its docstring says what it runs): the profile
and the flagged sets, their ablations against random sets (``run``), the summary of the cached results
(``summarise``) and its two plots; experiments/posthoc_compression_page.py renders its section of the page.

Cache keys (``experiments.posthoc_common.ResultCache`` of the compression study): 'super_profile' (the profile and
the flagged sets), 'super_aliases' (a set equal to an earlier one: that set's name), and in 'results'
'super/baseline', 'super/<set>/<mask|zero>', 'super/<set>/<random|random_same_layers><draw>/<mask|zero>' and
'super/single/<layer>_<expert>/<mask|zero>'.
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from experiments import posthoc_common as common
from experiments.stats import mean_std

TOP_N = (1, 2, 3)
RANDOM_SEED_OFFSET = 2024
Experts = Sequence[tuple[int, int]]


def zero_experts(config: ml_collections.ConfigDict, variables: dict[str, Any], experts: Experts) -> dict[str, Any]:
    """A copy of variables with the down-projection ('wo') of each (model layer, expert) set to 0: the paper's
    pruning (the expert is still selected; its output is zero)."""
    import jax
    from flax import core

    from moejax import model, moe

    new = jax.tree.map(lambda x: x, core.unfreeze(variables))  # new containers, shared arrays
    sites = model.moe_layer_paths(config.model)
    for layer, expert in experts:
        path, unit = sites[layer]
        tree = new["params"]
        for key in path:
            tree = tree[key]
        wo = np.array(tree[moe.EXPERTS]["wo"])
        wo[(expert,) if unit is None else (unit, expert)] = 0
        tree[moe.EXPERTS]["wo"] = wo
    return new


def random_sets(target: Experts, excluded: set[tuple[int, int]], layers: Sequence[int], num_experts: int, draws: int,
                same_layers: bool) -> list[list[tuple[int, int]]]:
    """``draws`` random sets of len(target) experts none of which is in ``excluded``: anywhere in the model, or
    (same_layers) one in the layer of each target expert."""
    out = []
    for draw in range(draws):
        rng = np.random.default_rng(RANDOM_SEED_OFFSET + draw + (1000 if same_layers else 0))
        if not same_layers:
            out.append(common.random_experts(rng, layers, num_experts, len(target), excluded))
            continue
        chosen: list[tuple[int, int]] = []
        for layer, _ in target:
            pool = [(layer, e) for e in range(num_experts) if (layer, e) not in excluded and (layer, e) not in chosen]
            chosen.append(pool[int(rng.integers(len(pool)))])
        out.append(sorted((int(a), int(b)) for a, b in chosen))
    return out


def profile_sets(cache: common.ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
                 calib: dict[int, list[np.ndarray]], say: Callable[[str], None]) -> dict[str, Any]:
    """The cached 'super_profile', computed when missing: ``super_experts.find`` over the union of the calibration
    sets, the paper rule's and the top three per calibration seed, and ``rule='top_n'`` for n in TOP_N."""
    from moejax.posthoc import super_experts

    info = cache.get("super_profile")
    if info is not None:
        return info
    started = time.perf_counter()
    found = super_experts.find(config, variables, [b for seed in sorted(calib) for b in calib[seed]])
    per_seed = {}
    for seed in sorted(calib):
        prof = super_experts.profile(config, variables, calib[seed])
        per_seed[str(seed)] = {
            "paper": [list(p) for p in super_experts.classify(prof, rule="paper").super_experts],
            "top3": [list(p) for p in super_experts.classify(prof, rule="top_n", top_n=3).super_experts]}
    info = cache.put("super_profile", {
        "paper": found.to_json(), "per_seed": per_seed,
        "top_n": {str(n): [list(p) for p in super_experts.classify(found.profile, rule="top_n", top_n=n).super_experts]
                  for n in TOP_N},
        "seconds": time.perf_counter() - started})
    say(f"super-expert profile over {found.profile.num_tokens:,} tokens in {info['seconds']:.1f}s: paper rule flags "
        f"{found.super_experts}")
    return info


def run(cache: common.ResultCache, config: ml_collections.ConfigDict, variables: dict[str, Any],
        calib: dict[int, list[np.ndarray]], bits_per_byte: Callable[[dict[str, Any], Any], float], random_draws: int,
        profile_plot: pathlib.Path, say: Callable[[str], None]) -> None:
    """The profile, its plot (to profile_plot), and every ablation not yet in the cache. bits_per_byte(variables,
    intervention): the validation bits per byte of the original config's model."""
    from moejax import model
    from moejax.moe import intervention as interventions

    layers = model.moe_layers(config.model)
    num_experts = config.model.moe.num_experts
    info = profile_sets(cache, config, variables, calib, say)
    plot_profile(info["paper"], profile_plot)
    sets = {"paper": [tuple(p) for p in info["paper"]["super_experts"]]}
    for n in TOP_N:
        sets[f"top{n}"] = [tuple(p) for p in info["top_n"][str(n)]]
    excluded = {tuple(p) for members in sets.values() for p in members}
    none_mask = interventions.mask_experts(config, {})
    results = cache.section("results")

    def ablate(key: str, experts: Experts, how: str) -> None:
        if key in results:
            return
        started = time.perf_counter()
        if how == "mask":
            by_layer: dict[int, list[int]] = {}
            for layer, expert in experts:
                by_layer.setdefault(layer, []).append(expert)
            value = bits_per_byte(variables, interventions.mask_experts(config, by_layer))
        elif how == "zero":
            value = bits_per_byte(zero_experts(config, variables, experts), none_mask)
        else:  # the baseline through the same function
            value = bits_per_byte(variables, none_mask)
        seconds = time.perf_counter() - started
        results[key] = {"experts": [list(p) for p in experts], "how": how, "bits_per_byte": value,
                        "seconds": seconds}
        cache.save()
        say(f"{key}: {value:.4f} bits/byte ({seconds:.1f}s)")

    ablate("super/baseline", [], "none")
    seen: dict[frozenset, str] = {}
    aliases = cache.section("super_aliases")
    for name, members in sets.items():
        if frozenset(members) in seen:  # the same experts as an earlier set: its results stand for this one
            aliases[name] = seen[frozenset(members)]
            cache.save()
            continue
        seen[frozenset(members)] = name
        if not members:
            continue
        for how in ("mask", "zero"):
            ablate(f"super/{name}/{how}", members, how)
        for same in (False, True):
            kind = "random_same_layers" if same else "random"
            for i, draw in enumerate(random_sets(members, excluded, layers, num_experts, random_draws, same)):
                for how in ("mask", "zero"):
                    ablate(f"super/{name}/{kind}{i}/{how}", draw, how)
    for layer, expert in sorted(excluded):  # every flagged expert alone (top1's random draws are the control)
        if [(layer, expert)] != sets["top1"]:
            for how in ("mask", "zero"):
                ablate(f"super/single/{layer}_{expert}/{how}", [(layer, expert)], how)


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """{'super': the profile's figures and the flagged experts (None before the profile), 'super_rows': per flagged
    set its ablations, 'super_baseline'} from the cache's data."""
    info = data.get("super_profile")
    results = data["results"]
    if info is None:
        return {"super": None}
    profile = info["paper"]
    a = np.asarray(profile["max_output"], np.float64)
    layers = profile["layers"]
    median_all = float(np.median(a))
    per_layer_median = np.median(a, axis=1)
    sets = {"paper": info["paper"]["super_experts"], **{f"top{n}": info["top_n"][str(n)] for n in TOP_N}}
    base = (results.get("super/baseline") or {}).get("bits_per_byte")
    aliases = data.get("super_aliases", {})
    rows = []
    for name, members in sets.items():
        row = {"name": name, "size": len(members), "experts": members, "target": None,
               "same_as": aliases.get(name)}
        name = aliases.get(name, name)
        for how in ("mask", "zero"):
            target = (results.get(f"super/{name}/{how}") or {}).get("bits_per_byte")
            row["target"] = target if row["target"] is None else row["target"]
            row[how] = {"target": target}
            for kind in ("random", "random_same_layers"):
                values = [r["bits_per_byte"] for key, r in results.items()
                          if key.startswith(f"super/{name}/{kind}") and key.endswith(f"/{how}")
                          and key[len(f"super/{name}/{kind}"):].split("/")[0].isdigit()]
                sets_drawn = [r["experts"] for key, r in sorted(results.items())
                              if key.startswith(f"super/{name}/{kind}") and key.endswith(f"/{how}")
                              and key[len(f"super/{name}/{kind}"):].split("/")[0].isdigit()]
                row[how][kind] = values
                row[how][f"{kind}_sets"] = sets_drawn
        rows.append(row)
    flagged = []
    for layer, expert in sorted({tuple(p) for members in sets.values() for p in members},
                                key=lambda p: -a[layers.index(p[0]), p[1]]):
        row = layers.index(layer)
        alone = {}
        for how in ("mask", "zero"):
            key = f"super/top1/{how}" if [[layer, expert]] == sets["top1"] else f"super/single/{layer}_{expert}/{how}"
            alone[how] = (results.get(key) or {}).get("bits_per_byte")
        flagged.append({"layer": layer, "expert": expert, "max_output": float(a[row, expert]), "alone": alone,
                        "channel": int(profile["channel"][row][expert]), "routed": int(profile["counts"][row][expert]),
                        "layer_median": float(per_layer_median[row]),
                        "over_layer_median": float(a[row, expert] / per_layer_median[row]),
                        "over_median": float(a[row, expert] / median_all),
                        "rules": [name for name, members in sets.items() if [layer, expert] in members]})
    sorted_a = np.sort(a.reshape(-1))[::-1]
    return {"super": {"profile": {k: profile[k] for k in ("rule", "percentile", "fraction", "threshold",
                                                          "super_experts", "layers", "num_tokens", "residual_max",
                                                          "residual_median", "residual_max_over_median")},
                      "median_max_output": median_all, "largest": sorted_a[:6].tolist(),
                      "per_layer_median": per_layer_median.tolist(), "per_layer_max": a.max(axis=1).tolist(),
                      "per_seed": info["per_seed"], "flagged": flagged, "seconds": info["seconds"],
                      "evaluations": sum(1 for key in results if key.startswith("super/")),
                      "seconds_per_evaluation": mean_std([r["seconds"] for key, r in results.items()
                                                           if key.startswith("super/")])[0]},
            "super_rows": rows, "super_baseline": base}


def plot_profile(summary: dict[str, Any], path: pathlib.Path) -> None:
    """``super_experts.plot`` of the profile stored as ``Profile.to_json`` (the paper rule's flags)."""
    from moejax.posthoc import super_experts

    profile = super_experts.Profile(
        layers=np.asarray(summary["layers"]), max_output=np.asarray(summary["max_output"], np.float64),
        channel=np.asarray(summary["channel"]), counts=np.asarray(summary["counts"]),
        residual_max=np.asarray(summary["residual_max"], np.float64),
        residual_median=np.asarray(summary["residual_median"], np.float64), num_tokens=int(summary["num_tokens"]))
    super_experts.plot(super_experts.classify(profile, rule="paper"), path=path)


def plot_ablation(summary: dict[str, Any], path: pathlib.Path) -> None:
    """Bits per byte of each flagged set minus the baseline, silenced and zeroed, beside its random sets."""
    from matplotlib.figure import Figure

    rows = [row for row in summary["super_rows"] if row["target"] is not None and not row.get("same_as")]
    if not rows:
        return
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=False)
    base = summary["super_baseline"]
    for ax, how in zip(axes, ("mask", "zero"), strict=True):
        x = np.arange(len(rows))
        for j, (what, color, label) in enumerate((("target", "C3", "flagged experts"),
                                                  ("random", "C0", "random (any layer)"),
                                                  ("random_same_layers", "C2", "random (same layers)"))):
            values = [row[how][what] for row in rows]
            if what == "target":
                heights = [v if v is not None else np.nan for v in values]
                ax.bar(x + (j - 1) * 0.27, np.asarray(heights) - base, 0.27, color=color, label=label)
            else:
                means = [np.mean(v) if v else np.nan for v in values]
                ax.bar(x + (j - 1) * 0.27, np.asarray(means) - base, 0.27, color=color, alpha=0.6, label=label)
                for k, v in enumerate(values):
                    ax.plot(np.full(len(v), x[k] + (j - 1) * 0.27), np.asarray(v) - base, ".", color="k",
                            markersize=3)
        ax.set_xticks(x, [f"{row['name']}\n(n={row['size']})" for row in rows], fontsize=8)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_title({"mask": "silenced: never selected (intervention mask)",
                      "zero": "zeroed down-projection (the paper's code)"}[how], fontsize=9)
        ax.set_ylabel("Δ validation bits/byte vs baseline")
    axes[0].legend(fontsize=7)
    fig.savefig(path, dpi=110)
