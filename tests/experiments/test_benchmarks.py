"""Every benchmark in experiments/ in its smoke mode (but bench_compile_cache, whose calls are fresh processes of
tens of seconds each: tests/test_cli.py checks what the cache does), and experiments/gpu_check.py --dry: each runs
in this process through its main(argv), and the JSON it prints (or writes) must hold its keys, with finite positive
figures where a figure must be positive. A refactor that breaks a benchmark fails here, not on the next person who
runs it.

One pytest-xdist worker runs them in order, so that gpu_check's decode part finds the programs that the
bench_generate smoke test compiled (moejax.generate keeps them by config and settings).
"""
import json
import math

import pytest

from experiments import (
    bench_expert_parallel,
    bench_generate,
    bench_hf_load,
    bench_lora,
    bench_moe_layer,
    bench_placement,
    bench_quant_decode,
    gpu_check,
)

pytestmark = pytest.mark.xdist_group("benchmarks")


def printed_json(text: str) -> dict:
    """The last top-level JSON object printed (its opening brace alone on a line) in a benchmark's stdout."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def assert_positive(row: dict, *keys: str) -> None:
    for key in keys:
        value = row[key]
        assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (key, value, row)


def test_bench_moe_layer_smoke(capsys):
    result = bench_moe_layer.main(["--smoke"])
    assert printed_json(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert set(result) == {"shape", "backend", "device", "dispatch", "gmm", "gmm_skipped", "layer"}
    assert set(result["dispatch"]) == {"jnp", "pallas", "jnp@32"}  # on CPU: pallas interpreted at 32 tokens
    for row in result["dispatch"].values():
        assert set(row) == {"tokens", "ms", "GB_per_s", "copy_GB_per_s", "fraction_of_copy", "interpreted"}
        assert_positive(row, "ms", "GB_per_s", "copy_GB_per_s", "fraction_of_copy")
    assert set(result["gmm"]) == {"tiled", "megablox"} and "ragged_dot" in result["gmm_skipped"]
    for row in result["gmm"].values():
        assert set(row) == {"tokens", "ms", "TFLOP_per_s", "dense_TFLOP_per_s", "fraction_of_dense", "interpreted"}
        assert_positive(row, "ms", "TFLOP_per_s", "dense_TFLOP_per_s", "fraction_of_dense")
    layer = result["layer"]
    assert_positive(layer, "dense_ffn", "dense_fwd_bwd_ms", "dense_TFLOP_per_s", "best_ratio_to_dense")
    assert tuple(layer["modes"]) == bench_moe_layer.SMOKE_MODES and layer["best_mode"] in layer["modes"]
    for mode, row in layer["modes"].items():
        assert_positive(row, "fwd_bwd_ms", "ratio_to_dense", "fraction_of_dense_rate", "max_over_mean_load")
        assert row["max_over_mean_load"] >= 1
        assert (row["drop_fraction"] > 0) if mode.startswith("capacity") else (row["drop_fraction"] == 0)


def test_bench_expert_parallel_smoke(capsys):
    rows = bench_expert_parallel.main(["--smoke"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == json.loads(json.dumps(rows))
    assert rows[0] == {"devices": 8, "platform": "cpu"}
    figures = {}
    for row in rows[1:]:
        figures.setdefault(row["figure"], []).append(row)
    state = figures["state_bytes_per_device"]
    assert [r["mesh"]["expert"] for r in state] == list(bench_expert_parallel.SMOKE_STATE_EXPERTS)
    for row in state:
        assert_positive(row, "bytes_per_device", "bytes_total", "ratio_to_replicated")
        assert row["ratio_to_replicated"] <= 1
    assert state[-1]["bytes_per_device"] < state[0]["bytes_per_device"]  # experts sharded 8 ways
    layer = figures["moe_layer_fwd_bwd"]
    assert [(r["ep_mode"], r["expert"]) for r in layer[1:]] == [("a2a", 8), ("ring", 8)]
    for row in layer:
        assert_positive(row, "seconds", *(["ratio_to_single_device"] if "ratio_to_single_device" in row else []))
    assert len(figures["a2a_bytes_per_layer_step"]) == 4
    for row in figures["a2a_bytes_per_layer_step"]:
        assert_positive(row, "bytes_sent_per_device", "gib_sent_per_device")


def test_bench_generate_smoke(capsys, tmp_path):
    result = bench_generate.main(["--smoke", "--json", str(tmp_path / "generate.json")])
    assert printed_json(capsys.readouterr().out) == json.loads((tmp_path / "generate.json").read_text())
    assert set(result) == {"machine", "settings", "cache", "rows"} and set(result["cache"]) == {"tiny", "v2lite"}
    assert result["cache"]["v2lite"]["values_per_token_layer"] < result["cache"]["v2lite"]["expanded_values"]  # MLA
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [("tiny", 1), ("v2lite", 1)]
    for row in result["rows"]:
        assert set(row) == {"model", "params", "batch", "prefill_tok_s", "decode_tok_s", "nocache_tok_s", "speedup"}
        assert_positive(row, "params", "prefill_tok_s", "decode_tok_s", "nocache_tok_s", "speedup")


def test_bench_hf_load_smoke(capsys):
    """Writes a 2 MiB deepseek_v2 checkpoint and loads it in a fresh process (no torch, no transformers)."""
    result = bench_hf_load.main(["--smoke"])
    assert printed_json(capsys.readouterr().out) == result
    (row,) = result["results"]
    assert row["family"] == "deepseek_v2" and row["files"] >= 2
    assert_positive(row, "checkpoint_bytes", "write_seconds", "load_seconds", "rss_before", "peak_rss", "rss_after",
                    "variables_bytes", "largest_parameter_bytes", "num_parameters")
    assert row["peak_rss"] >= row["rss_before"] and row["param_dtype"] == "bfloat16"


def test_bench_lora_smoke(capsys):
    """Full fine-tuning against LoRA in one run: the adapters train a fraction of the parameters, the optimizer
    state and the train state shrink, the base stays what it is (the same parameters plus the adapters)."""
    result = bench_lora.main(["--smoke"])
    assert printed_json(capsys.readouterr().out) == json.loads(json.dumps(result))
    full, adapted = result["full"], result["lora"]
    for row in (full, adapted):
        assert_positive(row, "parameters", "trained_parameters", "parameter_bytes", "optimizer_state_bytes",
                        "state_bytes", "step_peak_bytes", "step_temp_bytes", "step_argument_bytes", "step_total_bytes",
                        "step_seconds")
        assert row["state_bytes"] == row["parameter_bytes"] + row["optimizer_state_bytes"]
    assert full["trained_parameters"] == full["parameters"]
    assert adapted["parameters"] - full["parameters"] == adapted["trained_parameters"]  # the adapters alone
    ratios = result["lora_over_full"]
    assert ratios["trained_parameters"] < 0.2 and ratios["optimizer_state_bytes"] < 0.2 and ratios["state_bytes"] < 1
    assert ratios["step_temp_bytes"] < 1 and ratios["step_total_bytes"] < 1


def test_gpu_check_dry(tmp_path):
    """Every part on CPU at tiny shapes: the kernels and backends pass, every figure is there, nothing failed and
    every skip says why."""
    out = tmp_path / "gpu_check.json"
    record = gpu_check.main(["--dry", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(record, default=float))
    assert "part decode" in out.with_suffix(".log").read_text()
    assert {"platform", "device", "device_count", "jax", "jaxlib", "python", "packages", "started", "environment",
            "dry", "parts", "seconds", "skipped", "errors", *gpu_check.PARTS} <= set(record)
    assert record["platform"] == "cpu" and record["dry"] and record["errors"] == {}
    assert all(isinstance(why, str) and why for why in record["skipped"].values())

    assert record["correctness_passed"] and record["correctness_failed"] == []
    checks = record["correctness"]["checks"]
    assert all(check["passed"] and check["max_rel_err"] <= check["tol"] for check in checks.values())
    for name in ("gather_rows", "gather_combine", "gather_dot"):
        assert f"kernel/{name}/wide/float32" in checks
    for mode in ("dropless", "capacity"):
        assert f"kernel/permute_combine/{mode}/float32/vjp" in checks
    backends = {"tiled", "ragged_dot", "megablox", "tokamax"}
    ran = {name.split("/")[1] for name in checks if name.startswith("gmm/")}
    assert ran | set(record["correctness"]["skipped"]) == backends and {"tiled", "ragged_dot", "megablox"} <= ran
    for backend in ran:
        assert {f"gmm/{backend}/float32/forward", f"gmm/{backend}/float32/gradient"} <= set(checks)

    fractions = record["moe_layer"]["fractions"]
    assert set(fractions) == set(gpu_check.GOALS)
    assert fractions["layer_fraction_of_dense_rate"].keys() == set(gpu_check.DRY_MODES.split(","))
    for values in fractions.values():
        assert values and all(math.isfinite(v) and v > 0 for v in values.values())

    train = record["train_step"]
    assert_positive(train, "matmul_TFLOP_per_s")
    for name in ("moe", "dense"):
        assert_positive(train[name], "tokens_per_s", "step_ms", "model_flops_per_token", "mfu", "params_activated")
        assert math.isfinite(train[name]["loss"])
    # the dense model's FFN is the MoE's activated width: about the same activated parameters
    assert train["dense"]["params_activated"] == pytest.approx(train["moe"]["params_activated"], rel=0.05)

    rows = record["decode"]["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny", b) for b in bench_generate.SMOKE["batches"]]
    for row in rows:
        assert_positive(row, "prefill_tok_s", "decode_tok_s", "nocache_tok_s")


def test_bench_placement_smoke(capsys):
    result = bench_placement.main(["--smoke"])
    assert printed_json(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert_positive(result, "tokens")
    assert result["step_seconds_before"] is None and result["step_seconds_after"] is None  # smoke: no timing
    before, after = result["max_over_mean_before"], result["max_over_mean_after"]
    assert len(before) == len(after) == 2 and all(a < b for a, b in zip(after, before, strict=True))
    assert all(p >= 1.0 for p in result["predicted_after"])
    assert result["cluster"]["global"] < result["cluster"]["no_plan"]


def test_bench_quant_decode_smoke(capsys, tmp_path):
    result = bench_quant_decode.main(["--smoke", "--json", str(tmp_path / "quant.json")])
    assert printed_json(capsys.readouterr().out) == json.loads((tmp_path / "quant.json").read_text())
    assert set(result) == {"machine", "load", "settings", "rows"}
    assert [r["scheme"] for r in result["rows"]] == ["none", "int4/g32"]
    for row in result["rows"]:
        assert set(row) == {"scheme", "param_bytes", "memory_ratio", "batch", "prefill_tok_s", "decode_tok_s",
                            "speed_ratio", "step_argument_bytes", "step_temp_bytes"}
        assert_positive(row, "param_bytes", "memory_ratio", "prefill_tok_s", "decode_tok_s", "speed_ratio")
    assert result["rows"][0]["memory_ratio"] == 1.0 and result["rows"][1]["memory_ratio"] < 0.25
