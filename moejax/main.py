"""Trains a moejax model: ``python -m moejax.main --config=configs/<file>.py[:preset] [--workdir=DIR]``.

Override any config field with ``--config.<field>=<value>``, e.g. ``--config.model.moe.top_k=4``. The workdir
defaults to ``runs/<config file stem>[_<preset>]``; running the same command again resumes from it.
"""
import os
import pathlib
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from moejax import checks, train

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':<preset>'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, summary); default runs/<config>[_<preset>].")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def default_workdir(config_arg: str) -> str:
    """'configs/deepseekmoe.py:tiny' -> 'runs/deepseekmoe_tiny'."""
    path, _, preset = config_arg.partition(":")
    return str(pathlib.Path("runs") / (pathlib.Path(path).stem + (f"_{preset}" if preset else "")))


def initialize_distributed() -> None:
    """Multi-process JAX from the environment: MOEJAX_DISTRIBUTED=1 (TPU pods, SLURM / Open MPI clusters: JAX
    finds the coordinator), or MOEJAX_COORDINATOR=host:port with MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID;
    MOEJAX_CPU_COLLECTIVES=gloo for CPU processes."""
    env = os.environ
    if env.get("MOEJAX_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", env["MOEJAX_CPU_COLLECTIVES"])
    if env.get("MOEJAX_COORDINATOR"):
        try:
            count, index = int(env["MOEJAX_NUM_PROCESSES"]), int(env["MOEJAX_PROCESS_ID"])
        except (KeyError, ValueError):
            sys.exit("error: MOEJAX_COORDINATOR needs MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID set to integers "
                     f"(got {env.get('MOEJAX_NUM_PROCESSES')!r} and {env.get('MOEJAX_PROCESS_ID')!r})")
        jax.distributed.initialize(coordinator_address=env["MOEJAX_COORDINATOR"], num_processes=count,
                                   process_id=index)
    elif env.get("MOEJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO; progress goes to stdout
        logging.set_verbosity(logging.WARNING)
    initialize_distributed()
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir or default_workdir(config_arg), config_name=config_arg)
    except (checks.ConfigError, train.WorkdirError, train.DivergenceError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
