"""LoRAMoE: Alleviating World Knowledge Forgetting in Large Language Models via MoE-Style Plugin (Dou et al., arXiv
2312.09979), at the dense baseline's small shapes (configs/dense.py: 4 layers, d_model 256, SwiGLU 1408).

    python -m moejax.main --config=configs/loramoe.py --config.init_from=run:<dense run> \
        --config.data.name=text:<glob> --workdir=runs/loramoe

Supervised fine-tuning on a large amount of downstream data makes a model forget the world knowledge it learned in
pre-training. LoRAMoE freezes the backbone and adds, to each linear of the feed-forward layers, several LoRA experts
and a router that weights them (a softmax over all of them, no top-k), so the frozen FFN's knowledge stays and the
experts take the new data. Its localized balancing constraint splits the experts into two groups, one meant for the
world-knowledge tasks (task type 1) and one for the other downstream tasks (type 0): the router's weights summed
over a sample are scaled by 1 + delta on the group of the sample's type and 1 - delta on the other, and the squared
coefficient of variation of these over the batch and experts is added to the loss with weight beta (the authors'
blc_weight; delta is their blc_alpha).

Here: E = 6 LoRA experts of rank 32, alpha 64, dropout 0.05 on every FFN matrix (wi_0, wi_1, wo: LLaMA's gate, up
and down projections), delta 0.1, beta 1e-4; the training data is one task type (``model.lora.mixture.task_type``,
0: the downstream group) since moejax corpora carry no per-sample type (docs/methods.md, departures).

Presets:
* ``loramoe`` (default): LoRAMoE as above.
* ``mola``: MoLA (Gao et al., arXiv 2402.08562, "Higher Layers Need More LoRA Experts"): top-2 routing over LoRA
  experts whose count grows with depth, 2, 4, 6, 8 over the four layers (the authors' default allocation is 2, 4,
  6, 8 experts per quarter of LLaMA-2's 32 layers), rank 8, with a Switch load-balancing loss.

Fine-tune from a trained dense run or a released dense model (``init_from``, docs/data.md); the base stays frozen,
the optimizer trains the LoRA experts and routers only.
"""
import ml_collections
from moejax.configs import base

PRESETS: tuple[str, ...] = ("loramoe", "mola")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = base.preset(__file__, arg, PRESETS, default="loramoe")
    config = base.get_config()
    config.model.update(d_model=256, num_layers=4, num_heads=4, ffn_dim=1408, moe_every=0, scan_layers=False)
    lora, mixture = config.model.lora, config.model.lora.mixture
    lora.targets = ("ffn/(wi_0|wi_1|wo)",)
    config.train.update(learning_rate=2e-4, warmup_steps=10, weight_decay=0.0)
    if preset == "mola":
        lora.update(rank=8, alpha=16.0, dropout=0.05)
        mixture.update(per_layer=(2, 4, 6, 8), top_k=2, balance="switch", balance_coef=0.01)
        return config
    lora.update(rank=32, alpha=64.0, dropout=0.05)
    mixture.update(num_experts=6, top_k=0, balance="loramoe", balance_coef=1e-4, blc_alpha=0.1, task_type=0)
    return config
