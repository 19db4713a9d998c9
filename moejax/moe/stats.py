"""Typed statistics of the MoE layer: one ``RoutedStats`` record per routed pass, and the one ``collect`` that reads
them back from a forward pass.

Each routed pass sows one record under ``'moe_aux'/.../<MoE module>/stats`` (a tuple: Chain-of-Experts passes a
layer's tokens several times). Scanned layers (``model.scan_layers``) stack their records on a leading axis. The
losses in a record are unweighted: the training objective applies the coefficients. Consumers:

* the objective: ``collect(moe_aux)`` -> weighted router losses (moejax/training/objectives.py);
* the aux-loss-free bias update: each record's ``tokens_per_expert`` by the path of its module, which is also the
  path of that module's ``router_bias`` in ``'moe_state'`` (moejax/training/hooks.py);
* the metrics: ``by_layer(collect(moe_aux))`` -> one record per MoE layer, stacked [L] in layer order, each with
  its layer index stored (never rebuilt from the model's layout).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

STATS = "stats"  # the name every MoE layer sows its records under in the 'moe_aux' collection
ModulePath = tuple[str, ...]


@struct.dataclass
class RoutedStats:
    """One routed pass of one MoE layer (fields gain leading axes when layers are scanned or stacked).

    layer:               int32 []  the model layer index (0-based, counting dense layers).
    tokens_per_expert:   float32 [E]  routing slots given to each expert, before any dropping.
    dropped:             float32 []  slots dropped for lack of capacity.
    overflow:            float32 []  slots that did not fit the expert-parallel a2a buffer (also dropped).
    routed_slots:        float32 []  slots routed to a real expert (not null).
    num_tokens:          float32 []  tokens of the pass.
    router_entropy:      float32 []  mean over tokens of the entropy (nats) of the normalised router scores.
    balance_loss:        float32 []  unweighted expert-level balance loss (AdaMoE: null-pooled), 0 for 'none'.
    device_balance_loss: float32 []  unweighted device-level balance loss ('deepseek' with a device coefficient).
    z_loss:              float32 []  unweighted router z-loss.
    """

    layer: jax.Array
    tokens_per_expert: jax.Array
    dropped: jax.Array
    overflow: jax.Array
    routed_slots: jax.Array
    num_tokens: jax.Array
    router_entropy: jax.Array
    balance_loss: jax.Array
    device_balance_loss: jax.Array
    z_loss: jax.Array

    @property
    def drop_fraction(self) -> jax.Array:
        """Dropped slots (capacity and a2a overflow) over the routed slots."""
        return (self.dropped + self.overflow) / jnp.maximum(self.routed_slots, 1.0)

    @property
    def overflow_fraction(self) -> jax.Array:
        return self.overflow / jnp.maximum(self.routed_slots, 1.0)

    @property
    def experts_per_token(self) -> jax.Array:
        """Routed experts per token: top_k unless the router leaves slots null."""
        return jnp.maximum(self.routed_slots, 1.0) / self.num_tokens

    @property
    def max_over_mean_load(self) -> jax.Array:
        """max_e load / mean_e load."""
        load = self.tokens_per_expert
        return jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)

    @property
    def maxvio(self) -> jax.Array:
        """Loss-Free Balancing's MaxVio: max_over_mean_load - 1."""
        return self.max_over_mean_load - 1.0


# Per-layer scalars the metrics log, each a RoutedStats property or field.
LAYER_STATS = ("max_over_mean_load", "maxvio", "drop_fraction", "overflow_fraction", "experts_per_token",
               "router_entropy", "balance_loss", "device_balance_loss", "z_loss")


def combine(passes: tuple[RoutedStats, ...]) -> RoutedStats:
    """The passes of one layer as one record: counts and losses summed (each pass adds its losses to the
    objective), the layer and the token count of the first pass."""
    if len(passes) == 1:
        return passes[0]
    summed = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *passes)
    return summed.replace(layer=passes[0].layer, num_tokens=passes[0].num_tokens)


def collect(moe_aux: dict) -> dict[ModulePath, RoutedStats]:
    """{path of the MoE module: its record (passes combined)} from a forward pass's 'moe_aux' collection, in the
    sorted order of the paths (the order of ``jax.tree`` over the 'moe_state' collection)."""
    found: dict[ModulePath, RoutedStats] = {}

    def visit(node: dict, path: ModulePath) -> None:
        for key in sorted(node):
            if key == STATS:
                found[path] = combine(tuple(node[key]))
            elif isinstance(node[key], dict):
                visit(node[key], (*path, key))

    visit(dict(moe_aux), ())
    return found


def by_layer(collected: dict[ModulePath, RoutedStats]) -> RoutedStats | None:
    """All MoE layers' records stacked [L] in layer order (scanned records split into their layers); None for a
    dense model."""
    if not collected:
        return None
    flat = [jax.tree.map(lambda x, r=record: x.reshape(-1, *x.shape[r.layer.ndim:]), record)
            for record in collected.values()]
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *flat)
    order = jnp.argsort(stacked.layer)
    return jax.tree.map(lambda x: x[order], stacked)
