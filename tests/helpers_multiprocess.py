"""The config of tests/moe/test_parallel.py's multi-process test: the tiny test config on a data=2 x expert=4 mesh,
a few steps. Run as ``--config=tests/helpers_multiprocess.py`` by each process and by the 1-process reference."""
import ml_collections

from tests import helpers_train


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = helpers_train.get_config(arg)
    config.train.steps, config.train.log_every, config.train.eval_every = 6, 2, 0
    config.checkpoint.every_steps = 3
    config.mesh.update(data=2, fsdp=1, expert=4, tensor=1)
    return config
