"""Console output of a run: lines printed by process 0 only."""
import jax


def say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def duration(seconds: float) -> str:
    """H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
