"""Every moejax field with its default. Paper configs start from ``get_config()`` and change what the paper changes.
The ``model.moe`` section's fields are in configs/base_moe.py (``moe_config()``, re-exported here).

Run a config with ``python -m moejax.main --config=configs/<file>.py[:preset] --config.<field>=<value>``.
"""
import pathlib
from collections.abc import Sequence

import ml_collections
from moejax.configs.base_moe import moe_config  # noqa: F401 (the model.moe section; base.moe_config())

PRESETS: tuple[str, ...] = ()


def preset(config_file: str, arg: str | None, allowed: Sequence[str], default: str | None = None) -> str | None:
    """The preset a config file's ``get_config(arg)`` builds: ``arg``, or ``default`` when arg is None or ''.

    config_file: the config's path (``__file__`` or ``'configs/<name>.py'``; messages name it
    ``configs/<name>.py``). allowed: the file's presets (its ``PRESETS``); empty for a config without presets,
    which then refuses any non-empty ``arg``. Raises ValueError naming the file, the preset and the allowed ones.
    """
    name = f"configs/{pathlib.Path(config_file).name}"
    allowed = tuple(allowed)
    if default is not None and default not in allowed:
        raise ValueError(f"{name}: default preset {default!r} is not one of its presets {allowed}")
    if arg is None or arg == "":
        return default
    if not allowed:
        raise ValueError(f"{name} takes no preset (got {arg!r}); run it as {name}")
    if arg not in allowed:
        listed = ", ".join(repr(p) for p in allowed)
        raise ValueError(f"config preset {arg!r} of {name} is unknown: allowed presets are {listed}"
                         + (f" (default {default!r})" if default is not None else ""))
    return arg


def lora_config() -> ml_collections.ConfigDict:
    """The ``model.lora`` section: LoRA adapters (arXiv 2106.09685) on the weights its rules pick (moejax/adapters/,
    docs/adapters.md). With targets set, training updates the adapters only (the base weights stay frozen)."""
    lora = ml_collections.ConfigDict()
    # Regexes (re.search) over parameter paths such as layers_0/attn/q/kernel, layers_1/ffn/experts/wi_0,
    # layers_1/ffn/shared/wo, layers_1/ffn/router/kernel, lm_head/kernel (blocks/block_0/... with scan_layers).
    # Matrices only (attention projections, dense and shared GLUs, routers, the shared-expert gate, routed experts,
    # the LM head); every rule must pick one. () = no adapters: the model as it is.
    lora.targets = ()
    # Rank r, and alpha: the adapter adds (alpha / r) * x A B to x W (alpha / sqrt(r) with rslora, arXiv 2312.03732).
    lora.rank = 8
    lora.alpha = 8.0
    lora.rslora = False
    # Dropout on the adapter's input x (training only; routed-expert adapters: one mask per routed slot, one device).
    lora.dropout = 0.0
    # A's initialisation (B starts at zero): 'kaiming_uniform' (PEFT's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)))
    # | 'gaussian' (N(0, 1/r^2), PEFT's init_lora_weights='gaussian').
    lora.init = "kaiming_uniform"
    # Routed experts: 'per_expert' (A [E, in, r], B [E, r, out], one adapter per expert) | 'shared' (one A [in, r],
    # B [r, out] that every expert adds).
    lora.experts = "per_expert"
    # Mixtures of LoRA experts (moejax/adapters/mixture.py, docs/adapters.md): every picked weight gains E LoRA
    # experts (rank, alpha, dropout as above) and a router over them, in place of its one adapter. Dense weights only.
    mixture = ml_collections.ConfigDict()
    # E experts per picked weight; 0 = plain LoRA. LoRAMoE (arXiv 2312.09979) uses 6 on LLaMA's FFN.
    mixture.num_experts = 0
    # MoLA (arXiv 2402.08562): E per model layer, one count per layer (e.g. (2, 2, 4, 4, 6, 6, 8, 8): more experts in
    # higher layers); overrides num_experts. () = num_experts everywhere. Needs model.scan_layers=False.
    mixture.per_layer = ()
    # 0: every expert weighted by the router's softmax (LoRAMoE); k: the k best, weights renormalised (MoLA: 2).
    mixture.top_k = 0
    # The router's balance loss: 'loramoe' (LoRAMoE's localized balancing constraint over two expert groups, needs
    # task_type >= 0 and even expert counts) | 'switch' (Switch's E * sum_i f_i P_i) | 'none'.
    mixture.balance = "loramoe"
    # Its coefficient (LoRAMoE's blc_weight), summed over every adapted weight; 0 = no loss.
    mixture.balance_coef = 0.0
    # LoRAMoE's blc_alpha: importance 1 + alpha for the expert group of the sample's type, 1 - alpha for the other.
    mixture.blc_alpha = 0.0
    # The type of the training data for 'loramoe': 1 = the first half of the experts' group (the paper's world
    # knowledge), 0 = the second half; -1 = no localized constraint (the authors' code without task types).
    mixture.task_type = -1
    # Rank-heterogeneous experts (FlexMoRE-style): one rank per expert, e.g. (4, 8, 16, 32), each with scaling
    # alpha / r_e; () = model.lora.rank for every expert. Needs per_layer=(). Trained experts convert to such
    # adapters by SVD (moejax/adapters/conversion.py).
    mixture.ranks = ()
    lora.mixture = mixture
    return lora


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset(__file__, arg, PRESETS)
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Where a new run's weights come from (a workdir's newest checkpoint always wins: resume): '' = the model's own
    # initialisation; 'hf:<dir>' = a transformers checkpoint directory (moejax.hf: config.json + *.safetensors);
    # 'run:<dir>[@<step>]' = a moejax run directory (a run's workdir, or a model python -m moejax.posthoc --out wrote):
    # the params and moe_state of its newest checkpoint (or of <step>), with a fresh optimizer state from step 0.
    # The run's model section is then the source's (its config.json), except the fields of FIELD_ROLES's 'compute'
    # role below (dtypes, remat, dispatch, kernels, router-loss coefficients), which keep this config's values;
    # data.tokenizer left at 'bytes' becomes the source's tokenizer ('hf:<dir>' when <dir> has a tokenizer.json);
    # set otherwise, it must be the same tokenizer for 'run:'. See configs/finetune.py. 'upcycle:hf:<dir>' = a dense
    # transformers checkpoint upcycled into this config's MoE layout (moejax/upcycle_hf.py; upcycle.enabled=False).
    config.init_from = ""

    model = ml_collections.ConfigDict()
    # Embedding rows; at least the tokenizer's vocabulary (data.tokenizer): 256 for bytes.
    model.vocab_size = 256
    model.d_model = 256
    model.num_layers = 4
    model.num_heads = 4
    # Key/value heads for grouped-query attention; 0 means num_heads (multi-head attention).
    model.num_kv_heads = 0
    model.rope_theta = 10000.0
    model.norm_eps = 1e-6
    # The norm before attention, before the FFN and on the final output: 'rms' (RMSNorm, a scale) | 'layernorm'
    # (LayerNorm, a scale and a bias: PhiMoE) | 'rms_offset' (RMSNorm whose scale is stored as its offset from 1,
    # x / rms(x) * (1 + scale): Qwen3-Next). The query/key norms stay RMSNorm (with 'rms_offset', offset too)
    # and MLA's latent norms plain RMSNorm.
    model.norm = "rms"
    # Each block's norms: 'pre' (x + f(norm(x)): attn_norm, ffn_norm) | 'post' (OLMo 2, arXiv 2501.00656:
    # x + norm(f(x)), post_attn_norm / post_ffn_norm on the attention / FFN output; f reads the raw stream).
    model.norm_position = "pre"
    # A learned bias on the output head (PhiMoE's lm_head_bias); needs tie_embeddings=False.
    model.lm_head_bias = False
    # RMSNorm on each head's queries and keys before the rotary embedding (Qwen3, OLMoE).
    model.qk_norm = False
    # Where qk_norm normalises: 'head' (each head's Dh features: Qwen3) | 'proj' (the whole q and k projections
    # before the split into heads: OLMoE) | 'l2' (Llama 4: each head's Dh features by an RMSNorm without a scale,
    # after the rotary embedding, on the layers that have one; no parameters).
    model.qk_norm_scope = "head"
    # Width of each attention head (even, for the rotary pairs); 0 means d_model // num_heads.
    model.head_dim = 0
    # Biases on the q/k/v projections (Qwen2-MoE, GPT-OSS) and on the output projection (GPT-OSS).
    model.qkv_bias = False
    model.o_bias = False
    # Clamp q, k and v to [-clip_qkv, clip_qkv] after their projections (OLMoE option); 0 disables it.
    model.clip_qkv = 0.0
    # 'gqa' (grouped-query / multi-head attention) | 'mla' (DeepSeek's Multi-head Latent Attention, model.mla).
    model.attention = "gqa"
    # Learned per-head attention sink logits that join each softmax's denominator (GPT-OSS).
    model.attention_sinks = False
    # A sigmoid output gate per head (Qwen3-Next): the q projection gives each head 2 * Dh values, its queries and
    # the gate g; the head's output is multiplied by sigmoid(g) before the output projection. 'gqa' only.
    model.attention_gate = False
    # Per-layer attention kind ('full' | 'sliding' | 'chunked'), one entry per layer; () means every layer 'full'.
    # 'sliding' layers attend to the last sliding_window positions only, the query's own included: key j is seen
    # from query i when 0 <= i - j < sliding_window (GPT-OSS alternates them). 'chunked' layers attend within
    # their chunk of attention_chunk_size positions only: key j is seen from query i when j <= i and
    # i // attention_chunk_size == j // attention_chunk_size (Llama 4). With scan_layers, the scanned layers (from
    # first_dense_layers on) must share one kind.
    model.layer_types = ()
    model.sliding_window = 0
    model.attention_chunk_size = 0
    # Layers without a rotary embedding (NoPE; Llama 4's no_rope_layers with 0): distinct indices in
    # [0, num_layers); 'gqa' only, and empty with scan_layers.
    model.nope_layers = ()
    # Attention temperature tuning of the NoPE layers (Llama 4, after Scalable-Softmax, arXiv 2501.19399): the
    # queries at position p are multiplied by 1 + attn_temperature_scale * log(1 + floor((p + 1) /
    # attn_temperature_floor)). 0 disables it.
    model.attn_temperature_scale = 0.0
    model.attn_temperature_floor = 8192
    # Layers forced dense even where the MoE pattern would make them MoE (Qwen2-MoE's mlp_only_layers); distinct
    # indices in [0, num_layers). Must be empty with scan_layers.
    model.dense_layers = ()
    # Rotary layout: False rotates the two halves of the rotary dims (HF's rotate_half); True rotates interleaved
    # pairs (x0, x1), (x2, x3), ... (DeepSeek-V3's rope_interleave).
    model.rope_interleave = False
    # The fraction of each grouped-query head the rotary embedding turns: its first int(Dh * partial_rotary_factor)
    # dims (an even number; the two halves of those rotate), the rest pass unrotated (GLM-4.5: 0.5). 'gqa' only.
    model.partial_rotary_factor = 1.0
    rope_scaling = ml_collections.ConfigDict()
    # 'none' | 'yarn' (YaRN frequency interpolation with attention scaling: DeepSeek-V3, GPT-OSS) | 'longrope'
    # (LongRoPE: PhiMoE) | 'llama3' (Llama 3.1's frequency-band scaling) | 'linear' (position interpolation: every
    # frequency divided by factor). With 'yarn': factor >= 1, beta_fast and beta_slow > 0, mscale and
    # mscale_all_dim >= 0.
    rope_scaling.kind = "none"
    rope_scaling.factor = 1.0
    rope_scaling.original_max_position_embeddings = 4096
    rope_scaling.beta_fast = 32.0
    rope_scaling.beta_slow = 1.0
    # YaRN's mscale and mscale_all_dim: cos and sin get mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
    # both are non-zero, else mscale(factor) (0 stands for a field absent from a transformers config).
    # model.attention='mla' (DeepSeek) also multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
    rope_scaling.mscale = 1.0
    rope_scaling.mscale_all_dim = 0.0
    # Round the correction range to whole dimensions (HF's 'truncate', default True; GPT-OSS: False).
    rope_scaling.truncate = True
    # kind='longrope': inv_freq_i = 1 / (f_i * rope_theta^(2i / R)) over the R rotary dims, with cos and sin times an
    # mscale; f and the mscale are short_factor (R/2 numbers) and short_mscale while the sequence (its largest
    # position + 1) is at most original_max_position_embeddings, long_factor and long_mscale beyond.
    rope_scaling.short_factor = ()
    rope_scaling.long_factor = ()
    rope_scaling.short_mscale = 1.0
    rope_scaling.long_mscale = 1.0
    # kind='llama3': frequencies of wavelength > original_max_position_embeddings / low_freq_factor are divided by
    # factor, those of wavelength < original / high_freq_factor kept, the band between interpolated smoothly.
    rope_scaling.low_freq_factor = 1.0
    rope_scaling.high_freq_factor = 4.0
    model.rope_scaling = rope_scaling
    mla = ml_collections.ConfigDict()
    # Multi-head Latent Attention (DeepSeek-V2/V3): q through an optional low-rank q_lora_rank (0: a full
    # projection), keys and values from a kv_lora_rank latent plus one shared rope key of qk_rope_head_dim (even).
    # With 'mla', qkv_bias, qk_norm, clip_qkv and head_dim stay off and num_kv_heads is 0 or num_heads.
    mla.q_lora_rank = 0
    mla.kv_lora_rank = 512
    mla.qk_nope_head_dim = 128
    mla.qk_rope_head_dim = 64
    mla.v_head_dim = 128
    # LongCat-Flash's LoRA-rank scalings (arXiv 2509.01322): the queries times sqrt(d_model / q_lora_rank) and the
    # normalised latent c_kv times sqrt(d_model / kv_lora_rank); needs q_lora_rank > 0.
    mla.lora_scaling = False
    model.mla = mla
    linear = ml_collections.ConfigDict()
    # The linear-attention layers (model.layer_types entry 'linear': the Gated DeltaNet of Qwen3-Next, arXiv
    # 2412.06464; moejax/linear_attention.py): num_key_heads query/key heads of key_head_dim, num_value_heads (a
    # multiple of them) value heads of value_head_dim, a causal depthwise convolution over conv_kernel positions.
    linear.num_key_heads = 16
    linear.num_value_heads = 32
    linear.key_head_dim = 128
    linear.value_head_dim = 128
    linear.conv_kernel = 4
    # Positions per chunk of the chunked form of the delta rule (sequences; a decoded token steps the
    # recurrence); 0: the recurrence over every position.
    linear.chunk_size = 64
    model.linear_attention = linear
    # Hidden width of the dense GLU FFN in layers that are not MoE.
    model.ffn_dim = 704
    # Layer i is MoE when i >= first_dense_layers and (i - first_dense_layers) % moe_every == 0;
    # moe_every = 0 makes every layer dense.
    model.first_dense_layers = 0
    model.moe_every = 1
    # Shortcut-connected MoE (ScMoE, arXiv 2404.05019; LongCat-Flash, arXiv 2509.01322): a MoE layer also has a
    # dense GLU FFN (ffn_dim) on the same normalised input; the MoE's output joins the residual stream after the
    # next layer's FFN instead of its own. Every MoE layer must be followed by a dense one.
    model.moe_shortcut = False
    model.tie_embeddings = False
    # DeepSeek-V3's multi-token prediction (arXiv 2412.19437, section 2.2): D sequential modules, depth k predicting
    # the token k + 1 ahead from the previous depth's hidden state and the embedding of the token k ahead, sharing
    # the embedding and the output head; trained with mtp_loss_weight / D times the sum of their cross-entropies
    # (DeepSeek-V3: D = 1, weight 0.3, then 0.1). 0 modules: none. Inference ignores them (speculation aside).
    model.mtp_depth = 0
    model.mtp_loss_weight = 0.3
    # Std of the normal initialiser of every weight matrix (DeepSeekMoE: 0.006).
    model.init_std = 0.02
    # Compute dtype of activations and matmuls: 'float32' | 'bfloat16'. Parameters stay in param_dtype.
    model.dtype = "float32"
    model.param_dtype = "float32"
    # nn.scan over identical layers (faster compiles for deep models) and rematerialisation per layer.
    model.scan_layers = False
    model.remat = False
    model.moe = moe_config()
    model.lora = lora_config()
    config.model = model

    data = ml_collections.ConfigDict()
    # Corpus: 'stdlib' (this Python's standard-library sources, built once into a TFDS array_record dataset),
    # 'tfds:<name>[:<version>][:<train_split>[:<eval_split>]]' (a TFDS text dataset prepared with
    # --file_format=array_record; eval split defaults to 'validation', else 'test') or 'text:<glob>' (local files).
    data.name = "stdlib"
    # Cache of built corpora; '' means $MOEJAX_DATA_DIR, else ~/.cache/moejax.
    data.dir = ""
    # Fraction of files in the validation split (by sha256 of the relative path; fixed per file).
    data.val_fraction = 0.05
    # Validation batches used by each evaluation: windows evenly spaced over the whole validation split, in order.
    data.eval_batches = 8
    # TFDS data_dir for 'tfds:' datasets; '' means TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    data.tfds_dir = ""
    # Feature holding the document text in 'tfds:' datasets.
    data.text_key = "text"
    # Tokens (moejax/data/tokenizers.py): 'bytes' (token = byte, vocab 256, documents separated by 0) |
    # 'hf:<dir or path of tokenizer.json>' (a released model's tokenizer; documents separated by its eos token, from
    # the directory's tokenizer_config.json, generation_config.json or config.json) | 'bpe:<vocab_size>' (a
    # byte-level BPE trained once on the corpus's training split and cached in data.dir; '<|endoftext|>' separates
    # documents). model.vocab_size must be at least the tokenizer's vocabulary.
    data.tokenizer = "bytes"
    # Staged data mixing (moejax/data/mixing.py; Innovator, arXiv 2507.18671): mix = corpora trained on beside name;
    # mix_stages = ((until_step, w_0, w_1, ...), ...): until until_step a batch holds rows of (name, *mix) in the
    # ratio of the weights (largest-remainder rounding); the last stage lasts to the end. Needs a tokenizer shared by
    # every corpus ('bytes' or 'hf:'). Evaluation reads name's validation split.
    data.mix = ()
    data.mix_stages = ()
    config.data = data

    train = ml_collections.ConfigDict()
    # The defaults are the CPU budget of the tiny configs (about 10 minutes on 2 cores for deepseekmoe:tiny).
    train.steps = 150
    # Global batch (sequences) and tokens per sequence.
    train.batch_size = 16
    train.seq_len = 256
    # AdamW with global-norm clipping; peak learning rate after linear warm-up, then the schedule:
    # 'cosine' (down to min_lr_ratio * peak), 'step' (DeepSeekMoE: x step_decay_factor at each fraction of
    # step_decay_at), or 'constant'.
    train.learning_rate = 3e-3
    train.warmup_steps = 20
    train.schedule = "cosine"
    train.min_lr_ratio = 0.1
    train.step_decay_factor = 0.316
    train.step_decay_at = (0.8, 0.9)
    train.weight_decay = 0.1
    train.b1 = 0.9
    train.b2 = 0.95
    train.grad_clip = 1.0
    # THOR's consistency regulariser: > 0 runs each batch twice with independent random routings and adds
    # consistency_coef * 1/2 [KL(p1||p2) + KL(p2||p1)] to CE_1 + CE_2 (needs a random router, e.g. kind='thor').
    train.consistency_coef = 0.0
    # Routing warm-up (moejax/training/staging.py; Innovator, arXiv 2507.18671): the first router_warmup_steps
    # optimizer steps of a run train the MoE routers alone (every other parameter frozen); 0 = off.
    train.router_warmup_steps = 0
    # Console progress every log_every steps; validation every eval_every steps (0: only at the end).
    train.log_every = 10
    train.eval_every = 50
    config.train = train

    distill = ml_collections.ConfigDict()
    # Knowledge distillation from a frozen teacher (MC-SMoE's recovery of a pruned or merged model, arXiv
    # 2310.01334): the objective becomes ce_weight * CE + weight * KL(p_T || q_T) + the router losses, with
    # p_T = softmax(teacher logits / temperature) and q_T = softmax(student logits / temperature) at each position
    # (no T^2 factor, as the authors' code). The teacher runs its forward pass on the same batch in the same step
    # (eval mode, no gradient, no optimizer state, not saved in checkpoints). teacher: '' (off) | 'run:<dir>[@<step>]'
    # (a moejax run directory: a run's workdir or a post-hoc --out model) | 'hf:<dir>' (a transformers checkpoint
    # directory); it must share the run's tokenizer and model.vocab_size, and is computed with this config's
    # 'compute' fields (FIELD_ROLES). reduction of the KL over positions: 'token' (the mean, as the CE) |
    # 'batchmean' (the sum over positions / batch size: torch's KLDivLoss(reduction='batchmean') of the authors'
    # code, train.seq_len times 'token'). The defaults of weight and temperature are the authors' (kd_lambda 0.2,
    # kd_temperature 2.0, mlm_lambda 1.0). These fields have no FIELD_ROLES role: a run resumes with the same ones.
    distill.teacher = ""
    distill.weight = 0.2
    distill.temperature = 2.0
    distill.ce_weight = 1.0
    distill.reduction = "token"
    config.distill = distill

    quant = ml_collections.ConfigDict()
    # Quantisation-aware training (moejax/quant/qat.py, docs/quantisation.md): every training step's forward pass
    # runs on fake-quantised weights, the gradient reaches the full-precision weights through a straight-through
    # estimator. rules: '' (off) | 'TARGET=FORMAT[@LAYERS];...' as python -m moejax.posthoc quantise --rules, with
    # TARGET in attention, experts, shared, router, dense, lm_head or re:<regex> over parameter paths and FORMAT
    # int<b> (per output channel), int<b>/g<G> (groups of G inputs), ternary ({-1, 0, 1} times the matrix's mean
    # |w|: MoTE's routed experts, arXiv 2506.14435, with 'experts=ternary') or none. ste: 'identity' (the gradient
    # passes unchanged) | 'clipped' (zero where the grid clips the weight). Checkpoints keep the full-precision
    # weights; posthoc quantise with the same rules gives the weights the training forward used.
    quant.rules = ""
    quant.ste = "identity"
    config.quant = quant

    checkpoint = ml_collections.ConfigDict()
    # Save every every_steps steps (0: only at the end and on SIGTERM); keep the newest `keep`.
    checkpoint.every_steps = 50
    checkpoint.keep = 3
    config.checkpoint = checkpoint

    upcycle = ml_collections.ConfigDict()
    # Sparse upcycling (moejax/upcycle.py): initialise this MoE model from a dense checkpoint of the same model
    # with dense FFNs of width model.ffn_dim. dense_checkpoint: the workdir of a finished dense run; '' trains one
    # first in <workdir>/dense for dense_steps steps. granularity m: each expert is one of m slices of the dense FFN
    # (expert_ffn = ffn_dim / m; 1 = whole copies). router_init: 'normal' (fresh random) | 'zeros'.
    upcycle.enabled = False
    upcycle.dense_checkpoint = ""
    upcycle.dense_steps = 100
    upcycle.granularity = 1
    upcycle.router_init = "normal"
    config.upcycle = upcycle

    mesh = ml_collections.ConfigDict()
    # Device mesh axis sizes; -1 fills the remaining devices (at most one axis may be -1).
    mesh.data = -1
    mesh.fsdp = 1
    mesh.expert = 1
    mesh.tensor = 1
    config.mesh = mesh
    return config


# ----------------------------------------------------------------------------------------------- field metadata
# What kind of field a field is, beside the fields themselves: the tools read it through fields_with(role).
#   'resume'   may differ between a workdir's config.json and the config resuming it: how long the run goes, what it
#              logs and saves, and where the corpus is cached (the data-iterator state checks it is the same corpus).
#   'compute'  how the model is computed and trained, not the function its weights compute: a run with
#              init_from='hf:<dir>' keeps its own value (the checkpoint's config.json sets every other model field).
#   'eval'     an evaluation may change it (python -m moejax.evaluate --set): how the experts are dispatched and in
#              which dtype, never what the weights are, so any checkpoint loads unchanged.
FIELD_ROLES: dict[str, tuple[str, ...]] = {
    "train.steps": ("resume",),
    "train.log_every": ("resume",),
    "train.eval_every": ("resume",),
    "checkpoint.every_steps": ("resume",),
    "checkpoint.keep": ("resume",),
    "data.dir": ("resume",),
    "data.tfds_dir": ("resume",),
    "model.moe.dispatch": ("compute", "eval"),
    "model.moe.capacity_factor": ("compute", "eval"),
    "model.moe.eval_capacity_factor": ("compute", "eval"),
    "model.moe.drop_policy": ("compute", "eval"),
    "model.moe.gmm_backend": ("compute", "eval"),
    "model.moe.dispatch_kernel": ("compute", "eval"),
    "model.dtype": ("compute", "eval"),
    "model.param_dtype": ("compute",),
    "model.remat": ("compute",),
    "model.moe.gmm_tile": ("compute",),
    "model.moe.ep_mode": ("compute",),
    "model.moe.ep_buffer_factor": ("compute",),
    "model.moe.balance_loss": ("compute",),
    "model.moe.balance_coef": ("compute",),
    "model.moe.device_balance_coef": ("compute",),
    "model.moe.device_groups": ("compute",),
    "model.moe.balance_scope": ("compute",),
    "model.moe.z_loss_coef": ("compute",),
    "model.moe.entropy_loss_coef": ("compute",),
    "model.moe.bias_update_rate": ("compute",),
    "model.moe.router.jitter": ("compute",),
    "model.moe.router.frozen": ("compute",),
}
ROLES = ("resume", "compute", "eval")


def fields_with(role: str) -> tuple[str, ...]:
    """The dotted paths of the fields FIELD_ROLES gives role, in its order."""
    if role not in ROLES:
        raise ValueError(f"field role {role!r} is not one of {', '.join(ROLES)}")
    return tuple(path for path, roles in FIELD_ROLES.items() if role in roles)
