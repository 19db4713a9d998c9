"""``python -m moejax.posthoc`` (moejax/posthoc/__main__.py), every subcommand run in-process through ``main(argv)`` on
a tiny random Mixtral-layout model saved by ``moejax.hf.save`` (no torch) and a ``text:`` corpus.

The pruned models (transformers and moejax formats) are checked against the original model with a selection bias
of -inf on the experts pruning removed: that model never routes to them, which is what pruning claims to compute.
As a command: a trace stopped by Ctrl-C or a model stopped while written leaves nothing that blocks the same
command again; an existing trace is refused naming --overwrite, which also removes the old trace's analyses; usage
errors are one line and status 2, before the checkpoint loads.
"""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax
from moejax import hf, model
from moejax.posthoc import __main__ as cli
from moejax.posthoc import analysis, capture, importance, prune, read_trace
from moejax.posthoc.trace import trace_files
from tests.reference import minus_inf_bias

pytestmark = pytest.mark.xdist_group("posthoc_commands")  # one worker builds the module's release and trace once

@pytest.fixture(scope="module")
def traced(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace") / "trace"
    return cli.main(["trace", *release[1], "--out", str(out), "--with_scores"])


def test_trace_and_analyze(release, traced, tmp_path):
    trace = read_trace(traced)
    assert trace.num_tokens == 256 and trace.layers.tolist() == [0, 1] and trace.scores is not None
    assert trace.metadata["data"].startswith("text:") and trace.metadata["tokens"] == 256
    zeros = np.flatnonzero(trace.token_ids[:-1] == 0) + 1  # after every separator (the byte eos), a document
    assert set(zeros.tolist()) <= set(trace.doc_starts.tolist()) and set(range(0, 256, 32)) <= set(trace.doc_starts)
    # the recorded routing is the library's on the same calibration batches
    config, variables = hf.load(release[0])
    _, batches, _ = capture.calibration_batches(config, release[0], data=release[1][3], max_tokens=256, batch_size=4,
                                                seq_len=32, data_dir=release[1][5])
    np.testing.assert_array_equal(trace.token_ids, np.concatenate([b.reshape(-1) for b in batches]))

    result = cli.main(["analyze", "--trace", str(traced), "--out", str(tmp_path / "analysis"), "--lengths", "1,4,16"])
    saved = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert saved["summary"]["segment_lengths"] == [1, 4, 16] and saved["summary"]["num_tokens"] == 256
    np.testing.assert_allclose(saved["expert_frequency"], analysis.expert_frequency(trace))
    assert result["summary"] == saved["summary"]
    for name in ("frequency.png", "affinity.png", "local_consistency.png"):
        assert (tmp_path / "analysis" / name).stat().st_size > 1000


def test_importance(release, traced, tmp_path):
    out = tmp_path / "importance.json"
    result = cli.main(["importance", *release[1], "--criterion", "all", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["layers"] == [0, 1] and sorted(saved["scores"]) == sorted(importance.CRITERIA)
    assert saved == json.loads(json.dumps(result))
    trace = read_trace(traced)
    np.testing.assert_array_equal(saved["scores"]["frequency"], importance.from_trace(trace, "frequency"))
    np.testing.assert_allclose(saved["scores"]["soft_count"], importance.from_trace(trace, "soft_count"), rtol=1e-9)
    assert all(np.asarray(value).shape == (2, 4) for value in saved["scores"].values())


@pytest.mark.parametrize("fmt", ["hf", "moejax"])
def test_prune_writes_the_model_without_the_pruned_experts(release, traced, fmt, tmp_path):
    out = tmp_path / "pruned"
    flags = ["--keep", "2"] if fmt == "hf" else ["--keep", "4", "--global"]  # 4 over 2 layers: 2 each
    cli.main(["prune", *release[1], "--criterion", "frequency", *flags, "--out", str(out), "--format", fmt])
    what = json.loads((out / "posthoc.json").read_text())
    keep = {int(layer): ids for layer, ids in what["keep"].items()}
    assert keep == prune.keep_by_score(importance.from_trace(read_trace(traced), "frequency"), 2, [0, 1])
    new_config, new_variables = (hf.load if fmt == "hf" else moejax.load)(out)
    assert new_config.model.moe.num_experts == 2 and new_config.model.moe.top_k == 2

    config, variables = hf.load(release[0])
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)), jnp.int32)
    pruned = jax.jit(model.Transformer(new_config.model).apply)(new_variables, tokens)
    apply = jax.jit(model.Transformer(config.model).apply)
    reference = apply(minus_inf_bias(config, variables, keep), tokens)
    np.testing.assert_allclose(pruned, reference, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(apply(variables, tokens)) - reference).max() > 1e-3  # the pruned experts were used


def test_prune_takes_its_importance_from_a_trace(release, traced, tmp_path):
    """--trace: the scores of the recorded routing, no forward pass; the criteria a trace cannot give are refused."""
    out = tmp_path / "pruned"
    cli.main(["prune", *release[1], "--criterion", "soft_count", "--trace", str(traced), "--keep", "3", "--out",
              str(out)])
    what = json.loads((out / "posthoc.json").read_text())
    scores = importance.from_trace(read_trace(traced), "soft_count")
    np.testing.assert_array_equal(what["scores"], scores)
    assert what["trace"] == str(traced) and {int(k): v for k, v in what["keep"].items()} == \
        prune.keep_by_score(scores, 3, [0, 1])
    assert moejax.load(out)[0].model.moe.num_experts == 3
    with pytest.raises(ValueError, match=r"--criterion='reap': a routing trace \(--trace\) gives only frequency, "
                                         r"soft_count"):
        cli.main(["prune", *release[1], "--criterion", "reap", "--trace", str(traced), "--keep", "3", "--out",
                  str(tmp_path / "refused")])


@pytest.mark.parametrize("method", ["mcsmoe", "hcsmoe", "average"])
def test_merge_writes_a_loadable_model(release, method, tmp_path):
    out = tmp_path / "merged"
    cli.main(["merge", *release[1], "--method", method, "--experts", "3", "--out", str(out)])
    new_config, new_variables = moejax.load(out)
    # merges bind: the router keeps its 4 logical experts, each MoE layer stores the merged ones
    assert new_config.model.moe.num_experts == 4
    saved = json.loads((out / "posthoc.json").read_text())
    assert saved["method"] == method
    for layer, (params, _) in model.moe_layer_variables(new_config.model, new_variables).items():
        stored = params["experts"]["wo"].shape[0]
        assert saved["stored_experts"][str(layer)] == stored == max(new_config.model.moe.expert_map[layer]) + 1
        assert stored == 3 or method == "mcsmoe"  # MC-SMoE: 3 on average, uneven per layer
    logits = jax.jit(model.Transformer(new_config.model).apply)(new_variables, jnp.zeros((1, 8), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()


def test_merge_with_the_compress_stage(release, tmp_path):
    out = tmp_path / "compressed"
    cli.main(["merge", *release[1], "--method", "mcsmoe", "--experts", "2", "--align", "none", "--low_rank", "2",
              "--sparse_density", "0.25", "--out", str(out)])
    saved = json.loads((out / "posthoc.json").read_text())
    assert saved["align"] == "none" and saved["similarity"] == "router_logits" and saved["global_groups"]
    assert 0 < saved["compress"]["ratio"] < 1
    new_config, new_variables = moejax.load(out)
    logits = jax.jit(model.Transformer(new_config.model).apply)(new_variables, jnp.zeros((1, 8), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()


def test_super_experts(release, tmp_path):
    result = cli.main(["super-experts", *release[1], "--out", str(tmp_path), "--rule", "top_n", "--top_n", "2"])
    saved = json.loads((tmp_path / "super_experts.json").read_text())
    assert saved["super_experts"] == result["super_experts"] and len(saved["super_experts"]) == 2
    values = np.asarray(saved["max_output"])
    layer, expert = saved["super_experts"][0]
    assert values[saved["layers"].index(layer), expert] == values.max()
    assert (tmp_path / "super_experts.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["prune", "--criterion", "reap", "--keep", "5"], r"--keep=5: routed experts kept per MoE layer: an integer in "
                                                      r"\[1, 4\]"),
    (["prune", "--criterion", "reap", "--keep", "3", "--global"], r"--keep=3: with --global"),
    (["prune", "--criterion", "magnitude", "--keep", "2"], r"--criterion='magnitude'"),
    (["merge", "--method", "average", "--experts", "0"], r"--experts=0"),
    (["importance", "--criterion", "reap", "--data", "wiki"], r"--data='wiki' is not a corpus"),
    (["importance", "--criterion", "reap", "--max_tokens", "-1"], r"--max_tokens=-1"),
])
def test_bad_flags_are_named(release, argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):  # a flag given twice: the last one counts
        cli.main([argv[0], *release[1], *argv[1:], "--out", str(tmp_path / "out")])


def _torch_available() -> bool:
    from tests import helpers_hf

    return helpers_hf.has_torch()


@pytest.mark.skipif(not _torch_available(), reason="the live check needs torch and transformers (pip install -e .[hf])")
@pytest.mark.parametrize("command,extra", [("prune", ["--criterion=reap", "--keep=3"]),
                                           ("merge", ["--method=mcsmoe", "--experts=2"])])
def test_compressed_exports_run_in_transformers(release, tmp_path, command, extra):
    """A pruned or merged model written as a transformers directory loads in transformers with its new expert count
    and gives moejax's logits."""
    import torch
    import transformers

    out = tmp_path / command
    cli.main([command, *release[1], *extra, "--format=hf", "--out", str(out)])
    config, variables = hf.load(out)
    tokens = (np.arange(24, dtype=np.int32)[None] * 7) % 256
    ours = np.asarray(model.Transformer(config.model).apply(variables, jnp.asarray(tokens)))
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    # pruning slices the router; merging binds, written as copies of the merged experts
    assert theirs_model.config.num_local_experts == config.model.moe.num_experts == (4 if command == "merge" else 3)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_a_trace_stopped_by_ctrl_c_leaves_nothing_that_blocks_a_rerun(release, tmp_path, monkeypatch):
    out = tmp_path / "trace"

    def interrupted(total):
        def progress(tokens):
            assert (out / ".chunks").is_dir()  # the writer had started
            raise KeyboardInterrupt
        return progress

    monkeypatch.setattr(capture, "progress_bar", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["trace", *release[1], "--out", str(out)])
    assert trace_files(out) == []
    monkeypatch.undo()
    assert read_trace(cli.main(["trace", *release[1], "--out", str(out)])).num_tokens == 256  # no --overwrite


def test_an_existing_trace_is_refused_naming_overwrite_which_removes_its_analyses(release, traced, tmp_path):
    out = tmp_path / "trace"
    shutil.copytree(traced, out)
    cli.main(["analyze", "--trace", str(out), "--out", str(out / "analysis")])
    (out / "notes.txt").write_text("not the trace's")
    flags = [release[1][0], str(tmp_path / "missing"), *release[1][2:]]  # refused before --checkpoint is opened
    with pytest.raises(ValueError, match=r"--out='.*trace': already holds a routing trace \(manifest.json, "
                                         r".*\); pass --overwrite to replace it"):
        cli.main(["trace", *flags, "--out", str(out)])
    cli.main(["trace", *release[1], "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["doc_starts.npy", "experts.npy", "manifest.json", "notes.txt",
                                                     "token_ids.npy", "weights.npy"]  # without --with_scores


def test_a_model_stopped_while_written_is_removed(release, tmp_path, monkeypatch):
    from moejax.training import checkpoint

    def stopped(out, config, variables):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_variables", stopped)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["prune", *release[1], "--criterion", "frequency", "--keep", "2", "--out", str(tmp_path / "pruned")])
    assert not (tmp_path / "pruned").exists()


def test_prune_says_what_it_allows_and_that_it_lowers_top_k(release, tmp_path, capsys):
    for criterion in ("magnitude", "all"):
        with pytest.raises(ValueError, match=f"--criterion='{criterion}'") as refused:
            cli.main(["prune", *release[1], "--criterion", criterion, "--keep", "1", "--out", str(tmp_path / "x")])
        assert "or all" not in str(refused.value) and "frequency" in str(refused.value)
    cli.main(["prune", *release[1], "--criterion", "frequency", "--keep", "1", "--out", str(tmp_path / "pruned")])
    assert "top_k lowered from 2 to 1" in capsys.readouterr().err
    cli.main(["merge", *release[1], "--method", "average", "--experts", "1", "--out", str(tmp_path / "merged")])
    said = capsys.readouterr().err  # merging binds: top_k stays, both slots reach the one merged expert
    assert "top_k lowered" not in said and "bound to 1 stored experts" in said


@pytest.mark.parametrize("argv,status,message", [
    (["prune", "--criterion=magnitude", "--keep=2", "--out=x"], 2, "error: --criterion='magnitude': "),
    (["trace", "--max_tokens=-1", "--out=x"], 2, "error: --max_tokens=-1: must be an integer >= 0"),
    (["analyze", "--trace=missing", "--out=x"], 2, "error: --trace='missing': "),
    (["trace", "--step=7", "--out=x"], 2, "error: --step=7: "),
])
def test_usage_errors_are_one_line_and_status_2(release, argv, status, message, env, tmp_path):
    flags = release[1] if argv[0] != "analyze" else []
    result = subprocess.run([sys.executable, "-m", "moejax.posthoc", argv[0], *flags, *argv[1:]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == status and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr


def test_every_flag_has_help():
    subcommands = cli.parser()._subparsers._group_actions[0].choices
    assert sorted(subcommands) == ["analyze", "assemble", "importance", "merge", "merge-adapter", "offload", "place",
                                   "prune", "quantise", "steer", "super-experts", "trace"]
    assert [(name, action.dest) for name, sub in subcommands.items() for action in sub._actions
            if not action.help] == []
