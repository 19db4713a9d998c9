"""The MoE layer and its parts: routers (routers.py), balance and router losses (losses.py), token dispatch
(dispatch.py), expert kinds and grouped-matmul backends (experts.py), dispatch -> compute -> combine (pipeline.py),
the expert-parallel layer (expert_parallel.py), typed statistics (stats.py), and the Flax module (layer.py).

The names below are the MoE layer's parameter-tree names, spelled once here for the modules that match paths
(sharding rules, parameter counts, upcycling, checkpoint converters).
"""

ROUTER = "router"  # router/kernel [D, E + m]; Chain-of-Experts adds router_{c}
EXPERTS = "experts"  # the routed experts' stacked parameters, experts/<name> [E, ...]
SHARED = "shared"  # the fused shared-expert GLU
SHARED_GATE = "shared_gate"  # Qwen2-MoE's sigmoid gate on the shared experts
ROUTER_BIAS = "router_bias"  # 'moe_state': the selection-only bias [E]
IDENTITY_BIAS = "identity_bias"  # 'moe_state': the identity experts' selection-only bias [z] (num_identity_experts)


def is_router(name: str) -> bool:
    """Whether a module name is a router (``router`` or Chain-of-Experts' ``router_{c}``)."""
    return name == ROUTER or (name.startswith(ROUTER + "_") and name[len(ROUTER) + 1:].isdigit())


# The routers that sample in training (PhiMoE's SparseMixer, THOR) live in routers_sampling.py and register in
# routers.ROUTERS when imported: importing any moejax.moe module registers them.
from moejax.moe import routers_sampling  # noqa: E402, F401
