"""moejax.data.tokenizers and the token streams of the data pipeline under config.data.tokenizer.

References are independent of moejax: the bytes tokenizer against ``str.encode``; an 'hf:' tokenizer (trained here
with the ``tokenizers`` package) against ``tokenizers.Tokenizer.encode`` of the same file; the token streams of
'bpe:' corpora against the ``tokenizers`` encoding of the documents joined by ``<|endoftext|>``. Also: the eos
lookup, the bpe cache (reused, invalidated by another corpus), the workdir copy, the vocab-size check, the errors,
and the stdlib corpus with a BPE.
"""
import hashlib
import json

import ml_collections
import numpy as np
import pytest
import tokenizers as hf_tokenizers
from moejax.configs import base

from moejax import checks, data
from moejax.data import corpora, streams, tokenizers
from moejax.training import config as config_lib
from tests import helpers_hf
from tests.helpers_hf import TEXTS

EOT = "<|endoftext|>"


def make_config(data_dir, name, tokenizer, *, seq_len=16, val_fraction=0.2):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.train = ml_collections.ConfigDict({"batch_size": 2, "seq_len": seq_len})
    config.data = ml_collections.ConfigDict({"name": name, "dir": str(data_dir), "val_fraction": val_fraction,
                                             "eval_batches": 2, "tfds_dir": "", "text_key": "text",
                                             "tokenizer": tokenizer})
    return config


@pytest.fixture
def text_corpus(tmp_path):
    """12 documents with multi-byte characters; (root, {relpath: text})."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "δέλτα", "\n", "    ", "def", "return", "0123", "✓"]
    files = {}
    for i in range(12):
        rel = f"d{i % 3}/f{i:02d}.txt"
        files[rel] = " ".join(words[j] for j in rng.integers(0, len(words), rng.integers(50, 200)))
        (tmp_path / "corpus" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / rel).write_text(files[rel])
    return tmp_path / "corpus", files


def clear_caches():
    """Forget what this process loaded, as a new process would."""
    corpora._load_cached.cache_clear()
    streams.read_streams.cache_clear()
    tokenizers._load_hf.cache_clear()


def windows(stream, seq_len):
    return sorted(tuple(stream[i * seq_len:i * seq_len + seq_len + 1]) for i in range((len(stream) - 1) // seq_len))


# ----------------------------------------------------------------------------------------------- the tokenizers


def test_bytes_tokenizer_is_utf8(tmp_path):
    tok = tokenizers.from_spec("bytes")
    assert (tok.spec, tok.vocab_size, tok.eos_id, tok.fingerprint) == ("bytes", 256, 0, None)
    for text in TEXTS:
        assert tok.encode(text) == list(text.encode())
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0xFF, 0x41]) == "\ufffdA"  # errors='replace'
    assert tok.decode(np.array([104, 105, 300], np.int32)) == "hi\ufffd"  # arrays; an id of a padded embedding
    assert tokenizers.for_workdir(tmp_path).spec == "bytes"  # a workdir without tokenizer.json


def test_hf_tokenizer_equals_the_tokenizers_package(tmp_path):
    directory = helpers_hf.tokenizer_dir(tmp_path / "model")
    reference = hf_tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for spec in (f"hf:{directory}", f"hf:{directory / 'tokenizer.json'}"):
        tok = tokenizers.from_spec(spec)
        assert tok.spec == spec and tok.eos_id == reference.token_to_id("</s>") == 1
        assert tok.vocab_size == reference.get_vocab_size() == 300
        for text in TEXTS:
            assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
            assert tok.decode(tok.encode(text)) == tok.decode(np.array(tok.encode(text), np.uint16)) == text
    assert tok.fingerprint["sha256"] == hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    # the copy a run writes into its workdir is the same tokenizer
    tok.save(tmp_path / "run")
    copy = tokenizers.for_workdir(tmp_path / "run")
    assert (copy.eos_id, copy.fingerprint["sha256"]) == (1, tok.fingerprint["sha256"])
    assert copy.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_token_bytes_sum_to_the_text_bytes(tmp_path):
    """Bits per byte: a text's tokens stand for its UTF-8 bytes; the eos counts 1 like the byte separator."""
    tok, by = tokenizers.from_spec(f"hf:{helpers_hf.tokenizer_dir(tmp_path)}"), tokenizers.from_spec("bytes")
    for text in TEXTS[:-1]:
        for t in (tok, by):
            assert sum(t.token_bytes(i) for i in t.encode(text)) == len(text.encode())
    assert tok.token_bytes(tok.eos_id) == by.token_bytes(by.eos_id) == 1 and tok.token_bytes(0) == 0  # '<pad>'


def test_for_checkpoint_finds_the_tokenizer(tmp_path, text_corpus):
    directory = helpers_hf.tokenizer_dir(tmp_path / "release")
    assert tokenizers.for_checkpoint(directory).fingerprint == tokenizers.from_spec(f"hf:{directory}").fingerprint
    assert tokenizers.for_checkpoint(tmp_path / "empty").spec == "bytes"
    root, _ = text_corpus
    config = make_config(tmp_path / "cache", f"text:{root}/**/*.txt", "bpe:300")
    assert tokenizers.for_checkpoint(tmp_path / "empty", config).fingerprint == tokenizers.for_config(
        config).fingerprint
    (tmp_path / "old_run").mkdir()
    (tmp_path / "old_run" / "config.json").write_text(json.dumps({"data": {"tokenizer": "bpe:300"}}))
    with pytest.raises(ValueError, match=r"data.tokenizer='bpe:300' but no tokenizer.json"):
        tokenizers.for_checkpoint(tmp_path / "old_run")


@pytest.mark.parametrize("files,eos", [
    ({"tokenizer_config.json": {"eos_token": {"content": "</s>", "special": True}}}, 1),
    ({"tokenizer_config.json": {"bos_token": "<pad>"}, "generation_config.json": {"eos_token_id": [0, 1]}}, 0),
    ({"config.json": {"eos_token_id": 1, "model_type": "mixtral"}}, 1),
    ({"tokenizer_config.json": {"eos_token_id": 0}, "config.json": {"eos_token_id": 1}}, 0),
])
def test_hf_eos_lookup(tmp_path, files, eos):
    assert tokenizers.from_spec(f"hf:{helpers_hf.tokenizer_dir(tmp_path, files)}").eos_id == eos


def test_hf_without_eos_is_refused(tmp_path):
    directory = helpers_hf.tokenizer_dir(tmp_path, {"tokenizer_config.json": {"eos_token": "<missing>"}})
    with pytest.raises(ValueError, match=r"config.data.tokenizer='hf:.*': no end-of-document token: none of "
                                         r"tokenizer_config.json, generation_config.json, config.json"):
        tokenizers.from_spec(f"hf:{directory}")


@pytest.mark.parametrize("spec", ["words", "bpe:256", "bpe:x", "hf:", "hf:{tmp}/missing", 3])
def test_bad_specs_are_named(tmp_path, spec):
    spec = spec.format(tmp=tmp_path) if isinstance(spec, str) else spec
    with pytest.raises(ValueError) as e:
        tokenizers.from_spec(spec)
    assert f"config.data.tokenizer={spec!r}" in str(e.value) and "'bpe:<vocab_size>'" in str(e.value)


def test_vocab_size_is_checked_against_the_tokenizer(tmp_path):
    config = base.get_config()
    config.data.tokenizer = "bpe:1000"
    with pytest.raises(checks.ConfigError, match=r"model.vocab_size=256 is invalid: must be >= 1000, the vocabulary "
                                                 r"size of data.tokenizer='bpe:1000'"):
        config_lib.validate(config)
    config.model.vocab_size = 1024  # padded embeddings are fine
    config_lib.validate(config)
    config.data.tokenizer, config.model.vocab_size = f"hf:{helpers_hf.tokenizer_dir(tmp_path)}", 299
    with pytest.raises(checks.ConfigError, match=r"model.vocab_size=299 .* must be >= 300"):
        config_lib.validate(config)
    config.data.tokenizer = "hf:nowhere"
    with pytest.raises(checks.ConfigError, match=r"config.data.tokenizer='hf:nowhere': nowhere.* does not exist"):
        config_lib.validate(config)


# ----------------------------------------------------------------------------------------------- corpora


def test_bpe_is_trained_once_per_corpus(text_corpus, tmp_path, capsys, monkeypatch):
    root, _ = text_corpus
    config = make_config(tmp_path / "cache", f"text:{root}/**/*.txt", "bpe:300")
    tok = tokenizers.for_config(config)
    assert capsys.readouterr().out.count("training a byte-level BPE tokenizer (bpe:300)") == 1
    (built,) = (tmp_path / "cache").glob("bpe300-*.json")
    assert built.name == f"bpe300-{corpora.fingerprint_id(corpora.load(config).fingerprint)}.json"
    assert tok.vocab_size == 300 and tok.decode([tok.eos_id]) == EOT
    before = built.stat().st_mtime_ns

    clear_caches()
    monkeypatch.setattr(tokenizers, "train_bpe", lambda *a: pytest.fail("trained again"))
    assert tokenizers.for_config(config).fingerprint == tok.fingerprint
    assert tokenizers.from_spec("bpe:300", tmp_path / "cache").fingerprint == tok.fingerprint
    assert built.stat().st_mtime_ns == before
    monkeypatch.undo()

    (root / "d0" / "f00.txt").write_text("another corpus")
    clear_caches()
    other = tokenizers.for_config(config)
    assert "training a byte-level BPE" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("bpe300-*.json"))) == 2 and other.fingerprint != tok.fingerprint
    with pytest.raises(ValueError, match="for_config.*holds 2 such tokenizers"):
        tokenizers.from_spec("bpe:300", tmp_path / "cache")


def test_bpe_stream_is_the_documents_joined_by_eos(text_corpus, tmp_path):
    root, files = text_corpus
    config = make_config(tmp_path / "cache", f"text:{root}/**/*.txt", "bpe:320")
    fingerprint = data.corpus_fingerprint(config)
    (built,) = (tmp_path / "cache").glob("bpe320-*.json")
    reference = hf_tokenizers.Tokenizer.from_file(str(built))
    val = set(corpora.load(config).val_paths)
    assert val and len(val) < len(files)

    def expected(names):
        return reference.encode("".join(files[n] + EOT for n in sorted(names))).ids

    train, valid = expected(set(files) - val), expected(val)
    assert fingerprint["tokenizer"] == {"spec": "bpe:320", "sha256": hashlib.sha256(built.read_bytes()).hexdigest(),
                                        "vocab_size": reference.get_vocab_size(),  # <= 320: the merges ran out
                                        "eos_id": reference.token_to_id(EOT)}
    assert (fingerprint["train_tokens"], fingerprint["val_tokens"]) == (len(train), len(valid))
    it = data.train_iterator(config)
    count = (len(train) - 1) // 16
    rows = [tuple(r) for _ in range(count // 2 + 1) for r in next(it)]
    assert next(it).dtype == np.int32
    assert sorted(rows[:count]) == windows(train, 16)  # the first epoch: every window once
    n = (len(valid) - 1) // 16  # validation: 4 windows evenly spaced over the split, the first and the last included
    assert [tuple(r) for b in data.eval_batches(config) for r in b] == [
        tuple(valid[16 * i:16 * i + 17]) for i in (round(k * (n - 1) / 3) for k in range(4))]
    assert list(tmp_path.joinpath("cache").glob("tokens-*.npz"))  # encoded once, cached beside the tokenizer


def test_byte_split_cuts_a_document_in_two_pieces(tmp_path):
    text = "ab✓" * 40 + "end"  # the validation split starts inside a multi-byte character
    (tmp_path / "one.txt").write_text(text)
    directory = helpers_hf.tokenizer_dir(tmp_path / "model")
    config = make_config(tmp_path / "cache", f"text:{tmp_path}/one.txt", f"hf:{directory}", val_fraction=0.1)
    train, val = streams.token_streams(config)
    whole = text.encode() + b"\0"
    cut = len(whole) - round(len(whole) * 0.1)
    reference = hf_tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))

    def encode(raw):
        return reference.encode(raw.decode(errors="replace"), add_special_tokens=False).ids

    assert train.dtype == np.uint16 and list(train) == encode(whole[:cut])
    assert list(val) == encode(whole[cut:-1]) + [1]
    fingerprint = data.corpus_fingerprint(config)
    assert fingerprint["split"] == "bytes" and fingerprint["train_bytes"] == cut  # the byte split is unchanged


def test_stdlib_with_bpe(data_dir):
    config = make_config(data_dir, "stdlib", "bpe:400", seq_len=64, val_fraction=0.05)
    train, val = streams.token_streams(config)
    tok = tokenizers.for_config(config)
    corpus = corpora.load(config)
    assert train.dtype == np.uint16 and train.max() < 400
    first = np.flatnonzero(train == tok.eos_id)[99] + 1  # the first 100 training documents: lossless, eos-joined
    assert tok.decode(train[:first].tolist()) == "".join(t.decode() + EOT for t, _ in corpus.train[:100])
    assert tok.decode(val.tolist()) == "".join(t.decode() + EOT for t, _ in corpus.val)
    batch = next(data.train_iterator(config))
    assert batch.shape == (2, 65) and batch.dtype == np.int32


def test_tfds_documents_are_encoded_as_they_stream(tmp_path):
    """A prepared array_record dataset with a BPE trained on its train split: each row's lane decodes to whole
    training documents joined by <|endoftext|>."""
    tfds = pytest.importorskip("tensorflow_datasets")
    words = {"train": ["alpha", "beta", "gamma"], "validation": ["zyzzyva"]}
    docs = {split: [f"{split} doc {i}: " + " ".join(words[split][j % len(words[split])] for j in range(i % 7 + 20))
                    for i in range(n)] for split, n in (("train", 60), ("validation", 10))}

    class ToyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(d) for split, d in docs.items()}

        def _generate_examples(self, split_docs):
            for i, d in enumerate(split_docs):
                yield i, {"text": d}

    ToyText(data_dir=tmp_path / "tfds", file_format="array_record").download_and_prepare(download_dir=tmp_path / "dl")
    config = make_config(tmp_path / "cache", "tfds:toy_text", "bpe:300", seq_len=16)
    config.data.tfds_dir = str(tmp_path / "tfds")
    tok = tokenizers.for_config(config)
    assert data.corpus_fingerprint(config)["tokenizer"]["sha256"] == tok.fingerprint["sha256"]
    assert len(tok.encode(" alpha")) == 1 and len(tok.encode(" zyzzyva")) > 3  # trained on the train split only
    it = data.train_iterator(config)
    windows = [next(it) for _ in range(12)]
    for row in range(2):
        lane = [int(t) for t in windows[0][row]] + [int(t) for w in windows[1:] for t in w[row][1:]]
        assert tok.decode(lane).split(EOT)[1:-1] and set(tok.decode(lane).split(EOT)[:-1]) <= set(docs["train"])
    assert tok.decode(data.eval_batches(config)[0][0].tolist()).startswith("validation doc ")
