"""experiments/upcycling_study.py: the mixture never holds a domain's held-out files, the claims are paired
t-intervals over seeds with Holm (against scipy), and the whole pipeline (base, branches, average, DUME, FlexOlmo,
BTX, sparse upcycling, dense continuation, page, plot) runs at a tiny budget, resumes without training again and
rerenders from its JSON."""
from __future__ import annotations

import json
import math
import pathlib
import shutil
import sysconfig

import numpy as np
import pytest
from scipy import stats

from experiments import upcycling_study as study

TINY = ("d_model=16,num_layers=1,num_heads=2,ffn_dim=32,batch_size=8,seq_len=16,base_steps=2,branch_steps=1,"
        "post_steps=1,eval_tokens=128,calib_tokens=128,val_fraction=0.5")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two 'text:' domains of six small standard-library files each (json's and email's modules)."""
    root = tmp_path_factory.mktemp("domains")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    out = {}
    for name, package in (("json", "json"), ("email", "email")):
        (root / name).mkdir()
        for path in sorted((stdlib / package).glob("*.py"), key=lambda p: p.stat().st_size)[:6]:
            shutil.copy(path, root / name / path.name)
        out[name] = f"text:{root / name}/*.py"
    return out


def test_the_mixture_links_only_the_domains_training_files(domains, tmp_path):
    from moejax.data import corpora

    glob = study.mixture_glob(domains, tmp_path / "mixture", 0.5)
    linked = {p.resolve().read_bytes() for p in tmp_path.glob("mixture/*/*")}
    held_out = trained = 0
    for spec in domains.values():
        corpus = corpora._load_text(spec, 0.5)  # the data layer's own split of each domain
        root = pathlib.Path(spec[5:]).parent
        for rel in corpus.val_paths:
            assert (root / rel).read_bytes() not in linked
            held_out += 1
        for rel in corpus.train_paths:
            assert (root / rel).read_bytes() in linked
            trained += 1
    assert held_out and trained and len(linked) == trained and glob == f"text:{tmp_path / 'mixture'}/*/*"


def test_claims_are_paired_t_intervals_with_holm():
    rng = np.random.default_rng(0)
    rows = study.rows(["a", "b"])
    seeds = {str(s): {row: {"mixture": float(v)} for row, v in zip(rows, rng.normal(2.0, 0.1, len(rows)), strict=True)}
             for s in range(3)}
    claims = study.claims({"seeds": seeds})
    p_values = []
    for c, (row, reference, _) in zip(claims, study.CLAIMS, strict=True):
        def value(seed, name):
            if name == "best_source":
                return min(seeds[seed]["source:a"]["mixture"], seeds[seed]["source:b"]["mixture"])
            return seeds[seed][name]["mixture"]

        diffs = np.array([value(s, row) - value(s, reference) for s in seeds])
        half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / math.sqrt(3)
        assert c["mean"] == pytest.approx(diffs.mean()) and c["low"] == pytest.approx(diffs.mean() - half)
        p = stats.ttest_1samp(diffs, 0.0).pvalue
        assert c["p"] == pytest.approx(p)
        p_values.append(p)
    order = np.argsort(p_values)
    running = 0.0
    for rank, i in enumerate(order):  # Holm's step-down adjusted p-values
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        assert claims[i]["p_holm"] == pytest.approx(running)


def test_the_study_runs_resumes_and_rerenders(domains, tmp_path, capsys):
    args = ["--seeds", "1", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--data_dir",
            str(tmp_path / "data"), "--compile_cache", "off", "--budget", TINY,
            "--domains", ",".join(f"{k}={v}" for k, v in domains.items())]
    payload = study.main(args)
    rows = payload["seeds"]["0"]
    assert list(rows) == study.rows(domains)
    for losses in rows.values():
        assert set(losses) == {"json", "email", "mixture"}
        assert losses["mixture"] == pytest.approx((losses["json"] + losses["email"]) / 2)
        assert 0 < losses["mixture"] < 8  # a byte model: below log(256) = 5.5 plus a margin
    # BTX trained its assembled model on the mixture; the upcycled run started from source 0
    assert json.loads((tmp_path / "runs/seed0/btx/config.json").read_text())["init_from"].endswith("btx_init")
    assert (tmp_path / "runs/seed0/upcycled/summary.json").exists()
    page = tmp_path / "out" / "upcycling.md"
    assert (tmp_path / "out" / "upcycling.png").stat().st_size > 0
    text = page.read_text()
    assert "Rows that ran: " + ", ".join(study.rows(domains)) + "." in text and "not resolved at n=1" in text
    capsys.readouterr()
    again = study.main(args)  # everything cached: no training, the same numbers
    assert "trained" not in capsys.readouterr().out and again["seeds"] == payload["seeds"]
    page.write_text(text.replace(study.PLACEHOLDER, "hand-written findings"))
    study.main(["--render_only", "--out", str(tmp_path / "out")])
    assert "hand-written findings" in page.read_text()
