"""Trains several configs one after another in one process: ``python -m tests.zoo_runner SPEC.json``.

SPEC.json is a list of {"name", "config" (a config file), "overrides" ({dotted field: value}, as --config.<field>),
"workdir"}. Each run goes through moejax.training.loop.run, what ``python -m moejax.main`` calls once it has parsed
its flags; a run that raises leaves its traceback in <workdir>/error.txt and the next run goes on. tests/test_zoo.py
uses it so that the zoo's short trainings share one interpreter and one jax import instead of starting one each.
A run that takes more than RUN_SECONDS (a hang in the runtime) ends the process with every thread's traceback on
stderr, which the test shows, instead of holding the suite until the fixture's timeout.
"""
import faulthandler
import json
import pathlib
import sys
import traceback

RUN_SECONDS = 600  # a zoo run takes 5-60 s on 2 busy cores


def main(spec_path: str) -> None:
    import importlib.util

    from moejax.training import loop
    from tests.helpers_configs import override

    for run in json.loads(pathlib.Path(spec_path).read_text()):
        workdir = pathlib.Path(run["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"=== {run['name']}", flush=True)
        faulthandler.dump_traceback_later(RUN_SECONDS, exit=True)
        try:
            spec = importlib.util.spec_from_file_location(run["name"], run["config"])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            config = override(module.get_config(None), {k: tuple(v) if isinstance(v, list) else v
                                                         for k, v in run["overrides"].items()})
            loop.run(config, workdir, config_name=run["config"])
        except BaseException:  # noqa: BLE001 (the test reads it; the other runs go on)
            (workdir / "error.txt").write_text(traceback.format_exc())
        finally:
            faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main(sys.argv[1])
