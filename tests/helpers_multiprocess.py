"""One of the processes of tests/test_parallel.py's multi-process test: ``python -m tests.helpers_multiprocess
<process_id> <num_processes> <port> <workdir> <data_dir>``. Each process has 4 CPU devices; the mesh spans them all.
"""
import os
import sys


def main():
    process_id, num_processes, port, workdir, data_dir = sys.argv[1:6]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=int(num_processes),
                               process_id=int(process_id))
    from moejax import train
    from tests import helpers_train

    config = multiprocess_config(helpers_train.get_config(), data_dir)
    train.train_and_evaluate(config, workdir)


def multiprocess_config(config, data_dir):
    """The tiny config on a data=2 x expert=4 mesh, a few steps (shared with the single-process reference)."""
    config.data.dir = str(data_dir)
    config.train.steps, config.train.log_every, config.train.eval_every = 6, 2, 0
    config.checkpoint.every_steps = 3
    config.mesh.update(data=2, fsdp=1, expert=4, tensor=1)
    return config


if __name__ == "__main__":
    main()
