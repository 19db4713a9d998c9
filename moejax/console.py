"""Console output: a run's lines (printed by process 0 only), durations, and the progress bar of long passes over
data (moejax.evaluate, the post-hoc tools)."""
import sys
import time
from collections.abc import Callable

import jax


def say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_bar(total: int | None, what: str = "tokens", stream_=None) -> Callable[[int], None]:
    """A ``progress`` callback drawing one updating line on stderr: a bar when ``total`` is known, the count and the
    rate; a newline when ``total`` is reached."""
    out = sys.stderr if stream_ is None else stream_
    started = time.perf_counter()

    def show(done: int) -> None:
        rate = done / max(time.perf_counter() - started, 1e-9)
        if total:
            filled = int(30 * min(done / total, 1.0))
            text = f"\r[{'#' * filled}{'.' * (30 - filled)}] {done:,}/{total:,} {what} | {rate:,.0f} {what}/s"
        else:
            text = f"\r{done:,} {what} | {rate:,.0f} {what}/s"
        print(text, end="\n" if total and done >= total else "", file=out, flush=True)

    return show
