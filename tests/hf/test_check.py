"""``python -m moejax.hf check`` (moejax/hf/__main__.py): its comparison against scipy's relative entropy, and the
command on a golden fixture directory (transformers' part only where torch is installed)."""
import json

import numpy as np
import pytest
import scipy.special

from moejax.hf import __main__ as check_cli
from tests.helpers_configs import REPO

GOLDEN = REPO / "tests" / "hf" / "golden" / "mixtral_a"


def test_compare_is_the_kl_of_the_softmaxes():
    rng = np.random.default_rng(0)
    ours, theirs = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    got = check_cli.compare(ours, theirs)
    p, q = scipy.special.softmax(theirs, -1), scipy.special.softmax(ours, -1)
    kl = scipy.special.rel_entr(p, q).sum(-1)
    assert got["mean_kl"] == pytest.approx(kl.mean()) and got["max_kl"] == pytest.approx(kl.max())
    assert got["max_abs_logit_diff"] == pytest.approx(np.abs(ours - theirs).max())
    assert got["greedy_agreement"] == pytest.approx((ours.argmax(-1) == theirs.argmax(-1)).mean())
    same = check_cli.compare(ours, ours)
    assert same["mean_kl"] == pytest.approx(0, abs=1e-12) and same["greedy_agreement"] == 1.0


def test_check_command_on_a_released_layout(tmp_path, capsys):
    out = tmp_path / "check.json"
    result = check_cli.main(["check", str(GOLDEN), "--tokens", "6", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out)
    assert result["model_type"] == "mixtral" and result["tokens"] == [2, 6] and result["moejax_finite"]
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        assert result["transformers"] is None and "not installed" in result["why"]
    else:
        assert result["transformers"]["max_abs_logit_diff"] < 1e-3 and result["transformers"]["greedy_agreement"] == 1
    with pytest.raises(ValueError, match="--directory="):
        check_cli.main(["check", str(tmp_path)])
