"""Input pipelines: the embedded stdlib corpus, prepared TFDS datasets and local text files, and their tokens.

``config.data.name`` picks the corpus:

- ``'stdlib'`` (default): the ``.py`` files of this Python's standard library, without its test folders
  (``test``, ``tests``, ``idle_test``), ``site-packages`` and the machine-specific ``_sysconfigdata*``. The first
  call builds it into a TFDS dataset (array_record, no TensorFlow) under ``<data dir>/stdlib-py<ver>-<hash>-val<f>``;
  later calls reuse it. A file is in the validation split iff ``sha256(relative path)`` read as a fraction in
  [0, 1) is below ``config.data.val_fraction``, so the split never changes between machines with the same files.
- ``'tfds:<name>[:<version>][:<train_split>[:<eval_split>]]'``: a TFDS text dataset already prepared in
  array_record format (``tfds build lm1b --file_format=array_record``), read with ``tfds`` data sources, e.g.
  ``tfds:lm1b``, ``tfds:c4/en:3.1.0:train:validation``, ``tfds:lm1b:train[:90%]:train[90%:]``. The eval split
  defaults to ``validation``, else ``test``. Documents are ``record[config.data.text_key]``. Nothing is downloaded.
- ``'text:<glob>'``: local files (``**`` allowed), split by file like the stdlib; when that leaves a split
  empty (few files) the last ``val_fraction`` of the concatenated bytes is the validation split instead. Files that
  are not valid UTF-8 (binary files the glob caught) are skipped with a warning naming them.

``config.data.tokenizer`` picks the tokens (moejax/data/tokenizers.py; every corpus works with each):

- ``'bytes'`` (default): token = byte (``VOCAB_SIZE = 256``); each document is followed by ``SEPARATOR`` (0, absent
  from the stdlib's source files).
- ``'hf:<dir or tokenizer.json>'``: a released model's own tokenizer; each document is followed by its eos token
  (``eos_token_id`` / ``eos_token`` of the directory's tokenizer_config.json, generation_config.json or config.json).
- ``'bpe:<vocab_size>'``: a byte-level BPE trained once on the corpus's training split (a few seconds for the
  stdlib), cached in the data dir as ``bpe<vocab_size>-<corpus id>.json``; its ``<|endoftext|>`` ends each document.

``config.model.vocab_size`` must be at least the tokenizer's vocabulary (checked when a run's config is validated).
Documents are decoded as UTF-8 (errors='replace') for the text tokenizers and encoded without special tokens. The
tokenizer's fingerprint (its file's sha256, vocabulary size, eos id) joins ``corpus_fingerprint`` (and so the run
summary and the data-iterator state); byte-level corpora keep the fingerprint they always had. A batch is
``int32 [config.train.batch_size // process_count, config.train.seq_len + 1]``; inputs are ``[:, :-1]`` and
targets ``[:, 1:]``.

In-memory corpora (stdlib, text) are one token stream per split (uint8 bytes; uint16 or int32 ids of the other
tokenizers, encoded once and cached in the data dir as ``tokens-<corpus id>-<tokenizer id>.npz``), cut into windows
``stream[i*L : i*L + L + 1]`` (``L = seq_len``). Training shuffles the window order with grain (a new order each
epoch, derived from ``config.seed``); process ``p`` of ``P`` takes global positions ``p, p + P, ...``, so the ``P``
processes' batch ``i`` together hold exactly the single-process global batch ``i``. The iterator state is the step.
TFDS datasets are streamed: documents are shuffled by grain, encoded per document and packed into ``batch // P``
independent lanes per process (row ``r`` continues lane ``r``'s stream); the state is each lane's (document, offset
in tokens).
"""
from moejax.data import tokenizers
from moejax.data.corpora import NAMES_ALLOWED, SEPARATOR, VOCAB_SIZE, parse_name
from moejax.data.iterators import TrainIterator, checkpoint_windows, eval_batches
from moejax.data.mixing import train_iterator  # iterators.train_iterator, or mixed corpora (data.mix)
from moejax.data.streams import corpus_fingerprint

__all__ = ["NAMES_ALLOWED", "SEPARATOR", "VOCAB_SIZE", "TrainIterator", "checkpoint_windows", "corpus_fingerprint",
           "eval_batches", "parse_name", "tokenizers", "train_iterator"]
