"""The front door of moejax's commands: ``python -m moejax.main``, ``moejax.evaluate``, ``moejax.generate`` and every
``python -m moejax.posthoc`` subcommand share their flags, the way they open a checkpoint and one exit-status policy.

Exit status: 0 done; 1 the command cannot complete (what a checkpoint or workdir holds, divergence, I/O); 2 the
command is wrong (flags and their values, a --checkpoint or --step that names nothing usable, the data source),
found before anything loads wherever the flags alone tell; 130 stopped by Ctrl-C. An error is one line
``error: ...`` on stderr without a traceback (``--verbose`` or ``MOEJAX_VERBOSE=1`` prints it first). A reader that
closes the output pipe early (``| head``) ends the command quietly. Each command's ``main(argv)`` raises (tests call
it in-process); its ``__main__`` block is ``cli.run(main)``, which turns what it raises into the status.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import ml_collections

from moejax import checks

EXIT_RUNTIME, EXIT_USAGE, EXIT_ABORTED = 1, 2, 130
# What the library raises about the checkpoints, corpora and files it reads: one line and status 1 under ``run``.
LIBRARY_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, NotImplementedError)


class UsageError(ValueError):
    """The command is wrong: a flag, its value, or what it names (exit status 2)."""


class RunError(RuntimeError):
    """The command cannot complete with what it was given (exit status 1)."""


def flag_error(flag: str, value: Any, why: str) -> UsageError:
    """UsageError '--flag=value: why'."""
    return UsageError(f"--{flag}={value!r}: {why}")


# ----------------------------------------------------------------------------------------------- exit policy


def verbose(argv: Sequence[str]) -> bool:
    """Whether argv (the arguments after the program) asks for tracebacks: --verbose, or MOEJAX_VERBOSE=1."""
    if os.environ.get("MOEJAX_VERBOSE", "") not in ("", "0"):
        return True
    return any(arg in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for arg in argv)


def brief(message: str, loud: bool, max_lines: int = 3) -> str:
    """message, or when it runs longer than max_lines (a library's message quoted in it), its first line without
    the quote's unclosed parenthesis; loud (--verbose) keeps it whole."""
    lines = message.strip().splitlines()
    if loud or len(lines) <= max_lines:
        return message.strip()
    first, depth, cut = lines[0], 0, None
    for i, char in enumerate(first):
        if char == "(":
            depth, cut = depth + 1, (i if depth == 0 else cut)
        elif char == ")" and depth:
            depth -= 1
    if depth and cut is not None:
        first = first[:cut].rstrip()
    return f"{first} (--verbose shows the full message)"


def fail(message: str, status: int, loud: bool) -> NoReturn:
    """Prints 'error: message' (after the traceback of the exception being handled, when loud) and exits with
    status."""
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    if loud and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def quiet_stdout() -> None:
    """Points stdout at /dev/null: its reader has gone, and nothing more (not even the flush at exit) may fail."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def output(text: str) -> None:
    """print(text), quietly stopping when the reader of a pipe (e.g. head) has closed it."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        quiet_stdout()


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _described(error: BaseException) -> str:
    message = str(error).strip() or type(error).__name__
    return f"{type(error).__name__}: {message}" if isinstance(error, OSError) else message


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *,
        runtime: tuple[type[BaseException], ...] = LIBRARY_ERRORS) -> NoReturn:
    """Runs main(argv) (default: sys.argv[1:]) and exits with the status of the policy above: 0 when it returns; 2
    for UsageError and checks.ConfigError; 1 for RunError and the classes in runtime; 130 for
    Ctrl-C (KeyboardInterrupt: its message, if any, is the line printed). Any other exception is a bug and keeps its
    traceback; a SystemExit passes through."""
    argv = list(sys.argv[1:] if argv is None else argv)
    loud = verbose(argv)
    try:
        main(argv)
    except KeyboardInterrupt as e:
        fail(str(e) or "aborted by Ctrl-C", EXIT_ABORTED, False)
    except BrokenPipeError:
        quiet_stdout()
        sys.exit(EXIT_RUNTIME)
    except (UsageError, checks.ConfigError) as e:
        fail(brief(_described(e), loud), EXIT_USAGE, loud)
    except (RunError, *runtime) as e:
        fail(brief(_described(e), loud), EXIT_RUNTIME, loud)
    sys.exit(0)


# ----------------------------------------------------------------------------------------------- flags


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default when it has a meaningful one (not for required flags, None, False or '')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if action.required or default is None or default is False or default in ("", []):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' conventions: defaults shown by --help, a --verbose flag, and parse errors raised
    as UsageError (one line and exit status 2 under ``run``) instead of printed with the usage. Subcommand parsers
    (``add_subparsers().add_parser``) are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--verbose", action="store_true",
                          help="print the traceback of an error (also MOEJAX_VERBOSE=1)")

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} ({self.prog} --help shows the usage)")


COMPILE_CACHE_ENV = "MOEJAX_COMPILE_CACHE"  # the default --compile_cache; 'off' turns it off


def default_compile_cache() -> str:
    """$MOEJAX_COMPILE_CACHE, else ~/.cache/moejax/jax (a per-user directory)."""
    return os.environ.get(COMPILE_CACHE_ENV) or str(pathlib.Path.home() / ".cache" / "moejax" / "jax")


def enable_compile_cache(directory: str | None) -> str | None:
    """JAX's persistent compilation cache in ``directory`` (None, '' or 'off': leave it off): a later command with
    the same shapes loads its compiled programs instead of compiling them again. Returns the directory in use."""
    if not directory or directory == "off":
        return None
    import jax

    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(directory)


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (a workdir or a transformers directory, required), --step and --compile_cache;
    ``open_checkpoint`` reads them."""
    parser.add_argument("--checkpoint", required=True, help="a moejax workdir or a transformers checkpoint directory")
    parser.add_argument("--step", type=int, default=None, help="a workdir's checkpoint step (default: the newest)")
    parser.add_argument("--compile_cache", default=default_compile_cache(),
                        help=f"JAX's persistent compilation cache: a second call with the same shapes skips "
                             f"compiling ('off': none; default from ${COMPILE_CACHE_ENV})")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The validation data of a checkpoint: --data, --max_tokens, --batch_size, --seq_len, --data_dir (checked by
    ``check_data_flags``)."""
    parser.add_argument("--data", default=None, help="stdlib | text:<glob> | tfds:<name> (default: the checkpoint "
                                                     "config's data.name); evaluate reads its validation "
                                                     "split, the post-hoc commands the --calibration_split one")
    parser.add_argument("--max_tokens", type=int, default=0, help="this many tokens, rounded up to whole batches "
                                                                  "(0: the config's data.eval_batches batches)")
    parser.add_argument("--batch_size", type=int, default=0, help="rows per batch (0: the config's)")
    parser.add_argument("--seq_len", type=int, default=0, help="tokens per row (0: the config's)")
    parser.add_argument("--data_dir", default=None, help="where prepared corpora are cached (data.dir)")


def check_data_flags(args: argparse.Namespace) -> None:
    """UsageError naming the first of add_data_flags' flags whose value cannot be used; reads no data."""
    from moejax import data

    if args.data:
        try:
            data.parse_name(args.data)
        except ValueError:
            raise UsageError(f"--data={args.data!r} is not a corpus: allowed are {data.NAMES_ALLOWED}") from None
    for flag in ("max_tokens", "batch_size", "seq_len"):
        if getattr(args, flag) < 0:
            raise flag_error(flag, getattr(args, flag), "must be an integer >= 0 (0: the checkpoint config's own)")


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What --checkpoint and --step opened: the directory, its config and variables, and the workdir step read
    (None for a transformers directory)."""

    path: pathlib.Path
    config: ml_collections.ConfigDict
    variables: dict[str, Any]
    step: int | None

    @property
    def is_workdir(self) -> bool:
        return self.step is not None


def check_checkpoint(args: argparse.Namespace) -> list[int] | None:
    """The checkpoint steps of the workdir --checkpoint names (None for a transformers directory), after checking,
    without loading anything, that --checkpoint and --step name something to open: UsageError when the path does not
    exist, is a file, is neither kind of directory, or --step is not one of its steps (they are listed)."""
    from moejax import hf
    from moejax.training import checkpoint

    path = pathlib.Path(args.checkpoint)
    workdir = "a moejax workdir (config.json and checkpoints/)"
    transformers = "a transformers checkpoint directory (config.json with a model_type, and *.safetensors)"
    if not path.exists():
        raise flag_error("checkpoint", args.checkpoint, "does not exist")
    if not path.is_dir():
        raise flag_error("checkpoint", args.checkpoint, f"is a file; pass {workdir} or {transformers}")
    steps = checkpoint.checkpoint_steps(path)
    if steps:
        if args.step is not None and args.step not in steps:
            raise flag_error("step", args.step, f"{path} has the checkpoints of steps {', '.join(map(str, steps))}")
    elif hf.is_hf_dir(path):
        if args.step is not None:
            raise flag_error("step", args.step, f"{path} is a transformers checkpoint directory, which has no steps: "
                                                "leave --step out")
        return None
    elif not (path / "config.json").is_file():
        raise flag_error("checkpoint", args.checkpoint, f"is neither {workdir} nor {transformers}")
    return steps


def open_checkpoint(args: argparse.Namespace) -> Checkpoint:
    """The checkpoint of --checkpoint (a moejax workdir, at --step or its newest checkpoint, or a transformers
    directory): ``check_checkpoint``, the compilation cache of --compile_cache (``enable_compile_cache``), then
    ``moejax.load``; RunError when a workdir has no checkpoint yet."""
    from moejax.loading import load
    from moejax.training.checkpoint import WorkdirError

    steps = check_checkpoint(args)
    enable_compile_cache(getattr(args, "compile_cache", None))
    path = pathlib.Path(args.checkpoint)
    try:
        config, variables = load(path, step=args.step)
    except WorkdirError as e:  # a workdir without a checkpoint yet, one that cannot be read
        raise RunError(str(e)) from e
    step = None
    if steps is not None:
        step = steps[-1] if args.step is None else args.step
    return Checkpoint(path, config, variables, step)


# ----------------------------------------------------------------------------------------------- outputs


@contextlib.contextmanager
def removed_on_failure(path: str | os.PathLike) -> Iterator[None]:
    """Runs the block; when it raises (Ctrl-C included), removes what the block created at path (path itself when it
    did not exist before, else the entries of the directory path that were not there before) and re-raises, so that
    a failed command leaves nothing that stands in the way of running it again. Remote paths ('gs://...') are left
    alone."""
    remote = "://" in os.fspath(path)
    path = pathlib.Path(path)
    existed = path.exists()
    before = set(path.iterdir()) if existed and path.is_dir() and not remote else set()
    try:
        yield
    except BaseException:
        if remote:
            raise
        if not existed:
            created = [path]
        else:
            created = [p for p in path.iterdir() if p not in before] if path.is_dir() else []
        for entry in created:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        raise
