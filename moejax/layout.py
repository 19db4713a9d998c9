"""What each layer of the model is, from the ``model`` config section alone: MoE or dense (the layer pattern), and
its attention kind, sliding window or chunk and rotary embedding. Read by the model (moejax/model.py, which
re-exports these) and by the modules the model imports (routing interventions), so it imports nothing from moejax."""
import ml_collections


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
    """Layer i is MoE when i >= first_dense_layers, (i - first_dense_layers) % moe_every == 0 and i is not one of
    dense_layers."""
    return cfg.moe_every > 0 and layer >= cfg.first_dense_layers and \
        (layer - cfg.first_dense_layers) % cfg.moe_every == 0 and layer not in cfg.dense_layers


def moe_layers(cfg: ml_collections.ConfigDict) -> list[int]:
    """The indices of the MoE layers."""
    return [i for i in range(cfg.num_layers) if is_moe_layer(cfg, i)]


def layer_type(cfg: ml_collections.ConfigDict, layer: int) -> str:
    """Layer i's attention kind: cfg.layer_types[i], or 'full' when layer_types is empty."""
    return cfg.layer_types[layer] if cfg.layer_types else "full"


def attention_window(cfg: ml_collections.ConfigDict, layer: int) -> int:
    """The sliding window of layer i's attention (0: full causal attention)."""
    return cfg.sliding_window if layer_type(cfg, layer) == "sliding" else 0


def attention_chunk(cfg: ml_collections.ConfigDict, layer: int) -> int:
    """The chunk of layer i's attention (0: not a chunked layer): queries see the keys of their own chunk only."""
    return cfg.get("attention_chunk_size", 0) if layer_type(cfg, layer) == "chunked" else 0


def has_rope(cfg: ml_collections.ConfigDict, layer: int) -> bool:
    """Whether layer i's attention has a rotary embedding (False for the NoPE layers, ``model.nope_layers``)."""
    return layer not in cfg.get("nope_layers", ())
