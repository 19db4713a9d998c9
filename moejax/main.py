"""Trains a moejax model: ``python -m moejax.main --config=configs/<file>.py[:preset] [--workdir=DIR]``.

Override any config field with ``--config.<field>=<value>``, e.g. ``--config.model.moe.top_k=4``. The workdir
defaults to ``runs/<config file stem>[_<preset>]``; running the same command again resumes from it, and a finished
run run again prints its summary. ``--help`` lists the configs and their presets; ``--print_config`` prints the
resolved config and exits.

Errors are reported in a few lines without a traceback (``--verbose`` or ``MOEJAX_VERBOSE=1`` adds it), under the
policy of moejax/cli.py. Exit status: 0 when the run finished (now or before) or a SIGTERM / SIGINT stopped it after
saving a checkpoint; 1 when the run cannot go on (what its workdir holds, its checkpoints, divergence, I/O); 2 when
the command is wrong (flags, config file, preset, field names and values, the data source, a --workdir that is a
file or cannot be created); 130 when a second Ctrl-C aborted it.
"""
import ast
import difflib
import json
import os
import pathlib
import shlex
import sys
import traceback

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from moejax import cli

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':<preset>'.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, summary); default runs/<config>[_<preset>].")
flags.DEFINE_bool("print_config", False, "Print the resolved config (after overrides) as JSON and exit.")
flags.DEFINE_bool("verbose", False, "Print the traceback of an error (also MOEJAX_VERBOSE=1).")
FLAGS = flags.FLAGS

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


def default_workdir(config_arg: str) -> str:
    """'configs/deepseekmoe.py:tiny' -> 'runs/deepseekmoe_tiny'."""
    path, _, preset = config_arg.partition(":")
    return str(pathlib.Path("runs") / (pathlib.Path(path).stem + (f"_{preset}" if preset else "")))


def initialize_distributed() -> None:
    """Multi-process JAX from the environment: MOEJAX_DISTRIBUTED=1 (TPU pods, SLURM / Open MPI clusters: JAX
    finds the coordinator), or MOEJAX_COORDINATOR=host:port with MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID;
    MOEJAX_CPU_COLLECTIVES=gloo for CPU processes."""
    import jax

    env = os.environ
    if env.get("MOEJAX_CPU_COLLECTIVES"):
        jax.config.update("jax_cpu_collectives_implementation", env["MOEJAX_CPU_COLLECTIVES"])
    if env.get("MOEJAX_COORDINATOR"):
        try:
            count, index = int(env["MOEJAX_NUM_PROCESSES"]), int(env["MOEJAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise cli.UsageError(f"MOEJAX_COORDINATOR needs MOEJAX_NUM_PROCESSES and MOEJAX_PROCESS_ID set to "
                               f"integers (got {env.get('MOEJAX_NUM_PROCESSES')!r} and "
                               f"{env.get('MOEJAX_PROCESS_ID')!r})") from None
        jax.distributed.initialize(coordinator_address=env["MOEJAX_COORDINATOR"], num_processes=count,
                                   process_id=index)
    elif env.get("MOEJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------- --help


def configs_dir() -> pathlib.Path:
    """The config files of the installed package moejax.configs."""
    import moejax.configs

    return pathlib.Path(moejax.configs.__file__).resolve().parent


def _shown(path: pathlib.Path) -> str:
    """path relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path)


def config_catalogue() -> list[tuple[str, str, list[str], str | None]]:
    """(file name, first docstring line, presets, default preset) of every config file, read without running it."""
    entries = []
    for path in sorted(configs_dir().glob("*.py")):
        if path.name in ("__init__.py", "base.py") or path.name.startswith("base_"):  # base.py and its sections
            continue
        try:
            tree = ast.parse(path.read_text())
        except (OSError, SyntaxError):
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        presets: list[str] = []
        default = None
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "PRESETS" for t in targets) and node.value is not None:
                    try:
                        presets = list(ast.literal_eval(node.value))
                    except ValueError:
                        pass
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "preset":
                for keyword in node.keywords:
                    if keyword.arg == "default" and isinstance(keyword.value, ast.Constant):
                        default = keyword.value.value
        entries.append((path.name, doc[0] if doc else "", presets, default))
    return entries


def help_text() -> str:
    directory = configs_dir()
    lines = [
        "Trains a moejax model.",
        "",
        "usage: python -m moejax.main --config=<config file>[:<preset>] [--config.<field>=<value> ...] "
        "[--workdir=DIR]",
        "",
        "  --config=FILE[:PRESET]     a config file (below), optionally with one of its presets",
        "  --config.<field>=<value>   override any field, e.g. --config.model.moe.top_k=4 --config.train.steps=2000",
        "  --workdir=DIR              checkpoints, logs and summary; default runs/<config file stem>[_<preset>]; the",
        "                             same command again resumes the run (a finished one prints its summary)",
        "  --print_config             print the resolved config (after overrides) as JSON and exit",
        "  --verbose                  print the traceback of an error (also MOEJAX_VERBOSE=1)",
        "  --helpfull                 every flag, absl's included",
        "",
        f"Configs (in {_shown(directory)}/):",
    ]
    entries = config_catalogue()
    width = max((len(name) for name, *_ in entries), default=0) + 2
    for name, doc, presets, default in entries:
        lines.append(f"  {name:<{width}}{doc}")
        if presets:
            listed = ", ".join(f"{p} (default)" if p == default else p for p in presets)
            lines.append(f"  {'':<{width}}presets: {listed}")
    lines += [
        "",
        f"Every config field, with its default and what it does: {_shown(directory / 'base.py')}",
        "",
        "Ctrl-C or SIGTERM saves a checkpoint at the next step and exits 0; a second Ctrl-C aborts at once.",
        "Exit status: 0 done (or stopped after saving); 1 the run cannot go on (workdir, checkpoints, divergence,",
        "I/O); 2 the command is wrong (flags, config file, preset, fields, values, data source, --workdir path);",
        "130 aborted by a second Ctrl-C.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- flag errors


def _config_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg[len("--config="):]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_paths(argv: list[str]) -> list[tuple[str, str]]:
    """(field path, argument) of every --config.<field> override in argv."""
    found = []
    for arg in argv[1:]:
        for prefix in ("--config.", "--noconfig.", "-config.", "-noconfig."):
            if arg.startswith(prefix):
                found.append((arg[len(prefix):].split("=", 1)[0], arg))
    return found


def _field_paths(config: ConfigDict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, ConfigDict):
            paths += _field_paths(value, path + ".")
    return paths


def _has_field(config: ConfigDict, path: str) -> bool:
    node = config
    for part in path.split("."):
        part = part.split("[", 1)[0]
        if not isinstance(node, ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def unknown_field_hint(config: ConfigDict, path: str) -> str:
    """What to suggest for an override of a field path the config does not have: the closest names of its section
    (difflib), else that section's fields, else the closest full paths."""
    parent, _, name = path.rpartition(".")
    section = config
    for part in parent.split(".") if parent else []:
        section = section[part] if isinstance(section, ConfigDict) and part in section else None
    if isinstance(section, ConfigDict):
        close = difflib.get_close_matches(name, list(section.keys()), n=3, cutoff=0.6)
        if close:
            return "did you mean " + " or ".join(f"{parent}.{c}" if parent else c for c in close) + "?"
        return f"{parent or 'the config'} has the fields {', '.join(section.keys())}."
    close = difflib.get_close_matches(path, _field_paths(config), n=3, cutoff=0.6)
    return ("did you mean " + " or ".join(close) + "?") if close else "no field has a similar name."


def _load_config_file(config_arg: str) -> ConfigDict:
    """Runs config_arg's file like ml_collections does; raises cli.UsageError saying what is wrong."""
    import importlib.util

    path, *arg = config_arg.split(":", 1)
    listing = f"the configs are in {_shown(configs_dir())}/ (--help lists them)"
    if not path:
        raise cli.UsageError(f"--config is empty; {listing}")
    if not os.path.exists(path):
        raise cli.UsageError(f"config file {path} does not exist (--config={config_arg}); {listing}")
    if os.path.isdir(path):
        raise cli.UsageError(f"--config={config_arg} is a directory; pass a config file, e.g. "
                           f"--config={_shown(configs_dir() / 'deepseekmoe.py')}:tiny; {listing}")
    spec = importlib.util.spec_from_file_location("moejax_config_file", path)
    if spec is None or spec.loader is None:
        raise cli.UsageError(f"config file {path} is not a Python file (--config={config_arg})")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise cli.UsageError(f"config file {path} has no get_config() function")
        config = module.get_config(*arg)
    except cli.UsageError:
        raise
    except ValueError as e:  # the configs' own checks (configs/base.py preset) say what is allowed
        raise cli.UsageError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - any error in a config file is the config file's
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) ==
                  os.path.abspath(path)]
        where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
        raise cli.UsageError(f"config file {path} failed to load: {type(e).__name__}: {e}{where}") from e
    if not isinstance(config, ConfigDict):
        raise cli.UsageError(f"get_config() of {path} returned {type(config).__name__}, not an "
                           f"ml_collections.ConfigDict")
    return config


def _explain(argv: list[str], error: BaseException | None) -> str:
    """What is wrong with a command line whose flags did not parse (error) or whose config did not load."""
    config_arg = _config_arg(argv)
    if config_arg is None:
        if error is not None and not _override_paths(argv):
            return f"{error} (--help shows the usage)"
        return (f"--config is required, e.g. --config={_shown(configs_dir() / 'deepseekmoe.py')}:tiny; "
                f"--help lists the configs")
    config = _load_config_file(config_arg)  # raises cli.UsageError when the file is the problem
    for path, arg in _override_paths(argv):
        if not _has_field(config, path):
            return (f"unknown config field {path} (from {arg}): {unknown_field_hint(config, path)} Every field "
                    f"and its default is in {_shown(configs_dir() / 'base.py')}")
    message = str(error).strip() if error is not None else "the config did not load"
    first = message.splitlines()[0] if message else type(error).__name__
    return f"{first} (--help shows the usage)"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with moejax's --help; cli.UsageError saying what is wrong with the command line."""
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        cli.output(help_text())
        sys.exit(0)
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl's flags.Error, and plain errors of ml_collections for unknown fields
        raise cli.UsageError(_explained(argv, e)) from e
    if not isinstance(FLAGS.config, ConfigDict):  # None, or ml_collections' placeholder for a file that failed
        raise cli.UsageError(_explained(argv, None))
    return rest


def _explained(argv: list[str], error: BaseException | None) -> str:
    try:
        return _explain(argv, error)
    except cli.UsageError as e:
        return str(e)


# ----------------------------------------------------------------------------------------------- main


def resume_command() -> str:
    return "python -m moejax.main " + shlex.join(sys.argv[1:])


def main(argv: list[str]) -> int:
    """Trains (or reports) the run of the parsed flags. Raises cli.UsageError for a data source that cannot be read
    and a --workdir path that cannot be used, cli.RunError for what a workdir holds, its checkpoints, divergence
    and weights that cannot be read."""
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}: flags take the form --name=value (--help shows the "
                             f"usage)")
    config = FLAGS.config
    if FLAGS.print_config:  # with init_from='hf:<dir>': the model and tokenizer the run will train, read from <dir>
        from moejax.training import initialise

        cli.output(json.dumps(json.loads(initialise.resolve(config).to_json()), indent=2))
        return 0
    if not FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO; progress goes to stdout
        logging.set_verbosity(logging.WARNING)
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or default_workdir(config_arg)
    from moejax.hf.io import CheckpointError
    from moejax.training import checkpoint, initialise, loop, metrics

    try:
        initialize_distributed()
        config = initialise.resolve(config)  # once: the loop's entry points take a resolved config as it is
        if loop.report_finished(config, workdir) is None:
            loop.run(config, workdir, config_name=config_arg, resume_command=resume_command())
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"aborted by Ctrl-C; the newest checkpoint in {workdir}, if any, is where the same "
                                f"command resumes") from None
    except (loop.DataError, checkpoint.WorkdirPathError) as e:  # the data source, the --workdir path
        raise cli.UsageError(str(e)) from e
    except (checkpoint.WorkdirError, metrics.DivergenceError, CheckpointError) as e:  # what the run meets
        raise cli.RunError(str(e)) from e
    return 0


if __name__ == "__main__":
    cli.run(lambda argv: app.run(main, argv=[sys.argv[0], *argv], flags_parser=parse_flags), runtime=(OSError,))
