"""The post-hoc command tests' model and corpus."""
import pytest

TEXT = '''def fibonacci(n):
    """The n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()
'''


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(checkpoint dir, data flags): a 2-layer Mixtral-layout model (4 experts, top-2, byte vocabulary) written by
    moejax.hf.save, and the flags of ``python -m moejax.posthoc`` that read a text corpus of 6 files (the
    validation split: their last 5% of bytes) in batches of 4 x 32 tokens, 256 tokens in all."""
    from moejax import hf
    from tests import helpers_hf

    root = tmp_path_factory.mktemp("posthoc_release")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text(TEXT.replace("fibonacci", f"fib_{i}") * (3 + i))
    config, variables = helpers_hf.random_mixtral(vocab_size=256, num_layers=2)
    directory = hf.save(config, variables, root / "release")
    flags = ["--checkpoint", str(directory), "--data", f"text:{corpus}/*.py", "--data_dir", str(root / "data"),
             "--batch_size", "4", "--seq_len", "32", "--max_tokens", "256"]
    return directory, flags
