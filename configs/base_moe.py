"""configs/base.py's ``model.moe`` section (``base.moe_config()``): every field of one MoE layer (router, dispatch,
experts, balance) with its default. Not a config to run: ``python -m moejax.main`` lists ``base_*.py`` files as
parts of base.py."""
import ml_collections


def moe_config() -> ml_collections.ConfigDict:
    """The ``model.moe`` section: one MoE layer (router, dispatch, experts, balance)."""
    moe = ml_collections.ConfigDict()
    # Routed experts per MoE layer (E) and experts activated per token (k).
    moe.num_experts = 8
    moe.top_k = 2
    # Hidden width F of each routed expert's GLU: (act(x @ wi_0) * (x @ wi_1)) @ wo.
    moe.expert_ffn = 704
    # Shared experts every token passes through, fused into one GLU of width num_shared * expert_ffn.
    moe.num_shared = 0
    # AdaMoE null experts: m zero-compute experts in the router's top-k pool (needs router.kind='adamoe').
    moe.num_null_experts = 0
    # Identity (zero-computation) experts: z experts in the router's pool that return their input, times their
    # weight (LongCat-Flash, arXiv 2509.01322); router logits [T, E + z], ids E..E+z-1; needs a router kind that
    # handles them ('topk' without groups); their selection-only bias is moe_state identity_bias [z].
    moe.num_identity_experts = 0
    # Multiply the shared experts' output by sigmoid(x @ shared_gate) (Qwen2-MoE).
    moe.shared_gate = False
    # The routing weight multiplies each routed expert's input instead of its output: y = sum_j E_j(w_j * x)
    # rather than sum_j w_j * E_j(x) (Llama 4).
    moe.scale_expert_input = False
    # Expert nonlinearity: 'silu' | 'gelu' | 'relu'.
    moe.activation = "silu"
    # Routed expert kind (moejax/moe/experts.py EXPERT_KINDS): 'glu' = (act(x @ wi_0) * (x @ wi_1)) @ wo.
    moe.expert_kind = "glu"
    # expert_kind='gpt_oss' (GPT-OSS): biased SwiGLU with clamping, out = (clip(up, -limit, limit) + 1) *
    # g * sigmoid(alpha * g), g = min(gate, limit); experts carry biases on both projections.
    moe.swiglu_limit = 7.0
    moe.swiglu_alpha = 1.702
    # Width of the fused shared-expert GLU; 0 means num_shared * expert_ffn (Qwen2-MoE sets it on its own).
    # A width > 0 needs num_shared > 0.
    moe.shared_ffn = 0
    # 'dropless': every routed slot is computed (sort by expert, grouped matmul).
    # 'capacity': each expert takes at most C = ceil(capacity_factor * T * k / E) slots; the rest are dropped
    # (their contribution is 0, the residual passes) and counted.
    moe.dispatch = "dropless"
    moe.capacity_factor = 1.25
    # Capacity factor used when the layer runs with train=False; None means capacity_factor.
    moe.eval_capacity_factor = None
    # Which slots an expert keeps when over capacity: 'position' (token order) | 'probs' (highest weight first).
    moe.drop_policy = "position"
    # Grouped-matmul backend: 'tiled' (each expert's rows padded to whole tiles, a loop of plain matmuls over the
    # used tiles; fastest on XLA:CPU) | 'ragged_dot' (jax.lax.ragged_dot) | 'megablox' (jax's Pallas TPU grouped
    # matmul; interpreted on CPU) | 'tokamax' (tokamax.ragged_dot, where installed) | 'auto'.
    # 'auto': 'tiled' on CPU, 'megablox' on TPU, 'tokamax' on GPU if installed, else 'ragged_dot'.
    moe.gmm_backend = "auto"
    # Token permute / unpermute-combine: 'jnp' (XLA gathers) | 'pallas' (moejax.kernels.dispatch: Triton on GPU,
    # Mosaic on TPU, interpret mode on CPU, which is for tests only: slow).
    moe.dispatch_kernel = "jnp"
    # Rows per tile for the dropless 'tiled' backend; 0 picks about ceil(T * k / E) / 4 rounded up to a
    # multiple of 8. Capacity mode uses one tile of C rows per expert.
    moe.gmm_tile = 0
    # Expert parallelism over mesh.expert (moejax/parallel.py): 'a2a' (all_to_all of per-device buffers), 'ring'
    # (all_gather the tokens, psum_scatter the outputs) or 'ragged_a2a' (jax.lax.ragged_all_to_all; TPU/GPU only).
    moe.ep_mode = "a2a"
    # a2a buffer rows per destination device: 0 sizes them for the worst case (exact, never drops); f > 0 sizes
    # them as ceil(f * tokens_per_device * top_k / mesh.expert) and counts the slots that overflow (metrics).
    moe.ep_buffer_factor = 0.0
    # Load-balance loss: 'switch' (alpha * E * sum_i f_i P_i, f_i over all k assignments normalised by kT),
    # 'deepseek' (expert-level alpha1 * sum_i f'_i P_i with f'_i = E/(kT) * count_i, plus the device-level loss
    # with device_balance_coef over device_groups groups of experts) or 'none'. Both equal their coefficient
    # under perfectly uniform routing.
    moe.balance_loss = "switch"
    moe.balance_coef = 0.01
    moe.device_balance_coef = 0.0
    moe.device_groups = 1
    # Tokens over which f and P are computed: 'batch' (all tokens of the call) | 'sequence' (per sequence, then
    # averaged over the batch; DeepSeek's seq_aux).
    moe.balance_scope = "batch"
    # Router z-loss coefficient (ST-MoE): z_loss_coef * mean_t logsumexp(logits_t)^2.
    moe.z_loss_coef = 0.0
    # Router entropy penalty beta * mean_t(-sum_i P_ti log P_ti) ("dynamic loss" of top-p routing).
    moe.entropy_loss_coef = 0.0
    # Chain-of-Experts: C routed passes through the same experts, each with its own router (one shared router
    # with chain_shared_router), combined by chain_residual: 'outer' (no inner residual; the block adds its input
    # after the chain: C = 1 is the plain MoE layer), 'inner' (x_c = x_{c-1} + f_c(x_{c-1}); the block's output is
    # x_C, replacing the residual stream as the released code does) or 'inner_outer' (inner residual, and the
    # block adds x_C - x_0 to its input). Balance losses apply at every pass.
    moe.chain_iterations = 1
    moe.chain_shared_router = False
    moe.chain_residual = "outer"
    # Aux-loss-free balancing: after each train step b += bias_update_rate * sign(mean_load - load).
    # 0 disables the update (the bias stays 0).
    moe.bias_update_rate = 0.0
    # Expert maps (moejax/moe/expert_map.py): () or one row per model layer, each () or E ints sending logical
    # expert i to a stored expert (-1: removed). Written by post-hoc merging and non-uniform pruning.
    moe.expert_map = ()
    # Expert placement with replicas (moejax/moe/placement.py): () or one row per model layer, each () or P ints,
    # the stored expert each physical slot holds. Written by moejax.posthoc.placement (e.g. DeepSeek's EPLB plan).
    moe.expert_placement = ()

    router = ml_collections.ConfigDict()
    # Router kind, a key of moejax.moe.routers.ROUTERS.
    router.kind = "topk"
    # Affinity score: 'softmax' | 'sigmoid'.
    router.score = "softmax"
    # True: score over all E experts, then select (Mixtral, DeepSeek). False: select the top-k logits, then
    # softmax over the k selected (Megatron's default). Only matters for score='softmax'.
    router.softmax_before_topk = True
    # Renormalise the k selected weights to sum to 1 (Mixtral, Qwen3, DeepSeek-V3).
    router.norm_topk_prob = False
    # Multiplies the final weights (DeepSeek-V2: 16, V3: 2.5).
    router.routed_scaling_factor = 1.0
    # Group-limited selection (DeepSeek-V2/V3): experts split into num_groups groups; only the topk_groups
    # best groups are eligible. group_score: 'max' (V2) | 'top2_sum' (V3). Scores of the other groups are
    # replaced by group_mask_fill (0.0 or float('-inf')) before the top-k. num_groups=1 disables it.
    router.num_groups = 1
    router.topk_groups = 1
    router.group_score = "max"
    router.group_mask_fill = 0.0
    # Multiplicative router-input noise in training, x * U(1 - jitter, 1 + jitter) (Switch). 0 disables it.
    router.jitter = 0.0
    # kind='top_p': the cumulative router probability each token's experts must reach (top_k bounds their number).
    router.top_p = 0.4
    # kind='expert_choice': each expert takes ceil(ec_capacity * T / E) tokens (ec_capacity = mean experts/token).
    router.ec_capacity = 2.0
    # kind='hash': the seed of the fixed token-id -> expert map.
    router.hash_seed = 0
    # kind='smoe_dropout': k grows linearly from k_start (0: top_k) to top_k over training; evaluation uses
    # eval_top_k experts (0: top_k).
    router.k_start = 0
    router.eval_top_k = 0
    # Keep the router at its random initialisation: no gradient, no weight decay (SMoE-Dropout).
    router.frozen = False
    # A learned bias in the router's linear map, logits = x @ W + b (GPT-OSS): router/bias [E] float32, zeros at init.
    router.bias = False
    # kind='sparsemixer' (PhiMoE): at each slot, the experts whose logit lies more than 2 * jitter_eps (relative to
    # max(|logit|, the selected one's)) below the selected expert's leave the softmax its weight comes from
    # (PhiMoE's router_jitter_noise).
    router.jitter_eps = 0.01
    moe.router = router
    return moe
