"""Fine-tuning a released MoE model (moejax.hf families) from its transformers checkpoint, with its own tokenizer.

    python -m moejax.main --config=configs/finetune.py --config.init_from=hf:<dir> --config.data.name=text:<glob>

``init_from`` must name the checkpoint directory (config.json + *.safetensors; the placeholder 'hf:<dir>' is refused
by name). The run's ``model`` section is then the checkpoint's (``moejax.training.initialise.resolve``), except the
fields of ``initialise.RUN_FIELDS`` set here (how it is computed and trained), and ``data.tokenizer`` becomes
``hf:<dir>`` (the directory's tokenizer.json; its eos token separates documents) unless set to another. The first
state is the checkpoint's weights, evaluated before the first step; the newest checkpoint of the workdir wins as in
any run (the same command resumes). Export the result with ``moejax.hf.save(*moejax.load(workdir), out_dir)`` and
``moejax.data.tokenizers.for_workdir(workdir).save(out_dir)``.

Defaults, and why:
- learning rate 1e-5 (peak; a released model sits in a good minimum that a from-scratch rate of 1e-3 would leave)
  after 10 warm-up steps (Adam's second moments start at zero: the first updates would be too large), cosine decay
  to 10%, weight decay 0 (no pull towards zero away from the released weights), clipping at 1.0;
- 100 steps of 8 x 512 tokens: a short adaptation; raise ``train.steps`` for a real corpus;
- dropless dispatch: every routed slot is computed, as the released model was trained and evaluated (a capacity
  limit would drop tokens it never dropped); a small Switch balance loss (1e-3) keeps the load from collapsing;
- float32 parameters and compute (AdamW states in float32); set ``model.param_dtype`` and ``model.dtype`` to
  'bfloat16' when the model does not fit in float32.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ()  # this config takes no preset


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    base.preset(__file__, arg, PRESETS)
    config = base.get_config()
    config.init_from = "hf:<dir>"
    config.model.update(dtype="float32", param_dtype="float32")
    config.model.moe.update(dispatch="dropless", balance_loss="switch", balance_coef=1e-3)
    config.train.update(steps=100, batch_size=8, seq_len=512, learning_rate=1e-5, warmup_steps=10, schedule="cosine",
                        min_lr_ratio=0.1, weight_decay=0.0, grad_clip=1.0, log_every=10, eval_every=50)
    config.checkpoint.every_steps = 50
    return config
