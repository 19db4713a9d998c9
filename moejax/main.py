"""Trains a moejax model: ``python -m moejax.main --config=configs/<file>.py[:preset] [--workdir=DIR]``.

Override any config field with ``--config.<field>=<value>``, e.g. ``--config.model.moe.top_k=4``. The workdir
defaults to ``runs/<config file stem>[_<preset>]``; running the same command again resumes from it.
"""
import pathlib
import sys

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO; progress goes to stdout
        logging.set_verbosity(logging.WARNING)
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir or default_workdir(config_arg), config_name=config_arg)
    except (checks.ConfigError, train.WorkdirError, train.DivergenceError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
