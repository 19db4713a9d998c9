"""Training: the loop (loop.py: ``run`` and ``train_and_evaluate``), the jitted steps (step.py), objectives
(objectives.py), post-update hooks (hooks.py), the optimizer (optim.py), where the first state comes from
(initialise.py), checkpoints (checkpoint.py), metrics, logging and the summary (metrics.py), and config checks
(config.py)."""
