# %% [markdown]
# # Expert parallelism
#
# A mesh over all devices with the routed experts sharded over its `expert` axis: each device holds E / n of
# the experts, and the MoE layer exchanges tokens between devices inside `jax.shard_map`
# (`moejax/parallel.py`). We check that the expert-parallel layer computes the single-device layer's output
# and gradients on several meshes and exchange modes, then look at the memory each device needs for
# parameters and Adam's moments as the expert axis grows.
#
# On a TPU runtime the mesh uses its 8 TPU cores. On a CPU (or a single GPU or TPU chip) it uses 8 host CPU
# devices forced by `XLA_FLAGS`, which must be set before jax is imported: the first cell does that.

# %%
import os

# 8 host CPU devices; affects only the CPU platform, and only when set before jax is first imported
# (restart the runtime if jax was imported already)
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["XLA_FLAGS"] = flags.strip()

# Install moejax from its repository when it is not importable (Colab); a checkout installed with
# `pip install -e .` (or CI) already has it. The configs come with the package as `moejax.configs`.
import importlib.util
import subprocess
import sys

REPO_URL = "https://github.com/moejax/moejax"
if importlib.util.find_spec("moejax") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)

# %%
import jax
import numpy as np

# exact float32 matmuls, so that the comparison below measures the layer and not TPU's bfloat16 passes
jax.config.update("jax_default_matmul_precision", "highest")
platform = jax.default_backend()
devices = jax.devices()
if len(devices) == 1:  # one GPU or one TPU chip: show the layout on the 8 host CPU devices instead
    devices = jax.devices("cpu")
    jax.config.update("jax_default_device", devices[0])
print(f"platform: {platform}; the meshes below use {len(devices)} {devices[0].platform} devices")
print(devices)

# %% tags=["parameters"]
import os

# 'ci': a few steps of a small model (tests/experiments/test_notebooks.py); 'cpu': minutes on a laptop CPU;
# 'full': the preset's own budget, for a TPU or GPU runtime.
BUDGET = os.environ.get("MOEJAX_NOTEBOOK_BUDGET") or ("cpu" if platform == "cpu" else "full")

# the MoE layer compared below: x [BATCH, SEQ, D_MODEL], NUM_EXPERTS experts of width EXPERT_FFN, top-TOP_K
LAYER = {"ci": dict(BATCH=8, SEQ=4, D_MODEL=16, NUM_EXPERTS=8, EXPERT_FFN=8, TOP_K=2),
         "cpu": dict(BATCH=16, SEQ=32, D_MODEL=64, NUM_EXPERTS=16, EXPERT_FFN=32, TOP_K=4),
         "full": dict(BATCH=64, SEQ=256, D_MODEL=512, NUM_EXPERTS=64, EXPERT_FFN=256, TOP_K=6)}[BUDGET]

# %% [markdown]
# ## The single-device layer
#
# `moejax.moe.layer.MoE` with no mesh: route, sort the slots by expert, grouped matmul, combine. Its output and
# the gradients of a scalar function of it (with respect to the parameters and the input) are the reference.

# %%
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from moejax.configs import base

from moejax import parallel
from moejax.moe import layer as moe


def layer_config(ep_mode: str = "a2a"):
    cfg = base.moe_config()
    cfg.update(num_experts=LAYER["NUM_EXPERTS"], top_k=LAYER["TOP_K"], expert_ffn=LAYER["EXPERT_FFN"],
               dispatch="dropless", ep_mode=ep_mode)
    return cfg


x = jax.random.normal(jax.random.key(0), (LAYER["BATCH"], LAYER["SEQ"], LAYER["D_MODEL"]))
variables = moe.MoE(layer_config()).init(jax.random.key(1), x)
params, moe_state = variables["params"], variables["moe_state"]


def output_and_grads(layer: moe.MoE, params, x):
    def loss(params, x):
        y, _ = layer.apply({"params": params, "moe_state": moe_state}, x, train=True, mutable=["moe_aux"])
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads


y_ref, grads_ref = output_and_grads(moe.MoE(layer_config()), params, x)
print(jax.tree.map(lambda p: p.shape, params))


# %% [markdown]
# ## The same layer on meshes
#
# Mesh axes are `(data, fsdp, expert, tensor)`. The batch is split over `data x fsdp x expert`; the experts'
# leading axis over `expert`; their hidden width over `tensor`. `parallel.param_shardings` gives every
# parameter its sharding from its logical axis names. `ep_mode` picks the token exchange: `a2a`
# (all-to-all of per-device buffers), `ring` (all-gather the tokens, reduce-scatter the outputs), and on TPU
# and GPU also `ragged_a2a`.

# %%
def make_mesh(shape):
    return jax.make_mesh(shape, parallel.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(parallel.MESH_AXES))


n = len(devices)
shapes = [(n // e, 1, e, 1) for e in sorted({2, n}) if n % e == 0]  # the experts over 2 and over all devices
if n % 8 == 0:
    shapes.append((n // 8, 2, 2, 2))  # fsdp and tensor too
modes = ["a2a", "ring"] + (["ragged_a2a"] if devices[0].platform != "cpu" else [])

def relative_diff(a, b):
    """max |a - b| / max |b|."""
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


print("relative difference to the single-device layer, max |a - b| / max |b|")
print(f"{'ep_mode':>10} {'mesh (data, fsdp, expert, tensor)':>34} {'output':>9} {'gradients':>10}")
worst = 0.0
for shape in shapes:
    mesh = make_mesh(shape)
    sharded_params = jax.device_put(params, parallel.param_shardings(params, mesh))
    sharded_x = jax.device_put(x, NamedSharding(mesh, P(parallel.TOKEN_AXES)))
    for mode in modes:
        y, grads = output_and_grads(moe.MoE(layer_config(mode), mesh=mesh), sharded_params, sharded_x)
        output_diff = relative_diff(y, y_ref)
        pairs = zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True)
        grad_diff = max(relative_diff(a, b) for a, b in pairs)
        worst = max(worst, output_diff, grad_diff)
        print(f"{mode:>10} {str(shape):>34} {output_diff:9.1e} {grad_diff:10.1e}")
assert worst < 1e-5, f"the expert-parallel layer differs from the single-device layer by {worst:.1e}"

# %% [markdown]
# Where the expert weights live on the last mesh: every device holds a slice of the experts (and, with
# `fsdp` and `tensor` > 1, of their model and hidden widths). The router's expert axis is never split: each
# device routes its own tokens over all experts.

# %%
wi_0 = sharded_params["experts"]["wi_0"]
print(f"experts/wi_0 {wi_0.shape} on mesh {dict(mesh.shape)}: {wi_0.sharding.spec}")
for shard in wi_0.addressable_shards:
    experts = shard.index[0]
    print(f"  {shard.device}: experts {experts.start}..{experts.stop - 1}, block {shard.data.shape}")
print(f"router/kernel {sharded_params['router']['kernel'].shape}: "
      f"{sharded_params['router']['kernel'].sharding.spec} (its expert axis is never split)")

# %% [markdown]
# ## Memory per device
#
# Parameters plus Adam's two moments, per device, as the `expert` axis grows (the rest of the devices on
# `data`, so everything that is not a routed expert stays replicated). `parallel.state_shardings` gives the
# shardings of a whole train state; the bytes per device follow from the shard shapes, so this works for
# models far too large to allocate here (nothing below is allocated but the small model). For that one, the
# arrays are also materialised and measured with `parallel.bytes_per_device`.
#
# `num_experts` must be a multiple of `mesh.expert` for the experts to split: the `tiny` and `2b` DeepSeekMoE
# presets have 63 routed experts, so they are shown with 64 here (the layer itself pads 63 to a multiple
# and stays exact, but the stored weights stay whole on every device).

# %%
import math

import matplotlib.pyplot as plt
from moejax.configs import deepseekmoe

from moejax import model
from moejax.training import optim, step


def abstract_state(config):
    module = model.Transformer(config.model)
    tx = optim.make_optimizer(config)

    def init(key):
        variables = module.init(key, jnp.zeros((1, 8), jnp.int32))
        return step.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                opt_state=tx.init(variables["params"]),
                                moe_state=variables.get("moe_state", {}))

    return init, jax.eval_shape(init, jax.random.key(0))


def bytes_per_device(state, expert):
    """(routed-expert bytes, other bytes) of a train state's shards on one device with mesh.expert = expert."""
    shape = (n // expert, 1, expert, 1)
    shardings = parallel.state_shardings(state, make_mesh(shape))
    totals = {True: 0, False: 0}
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        routed = "'experts'" in jax.tree_util.keystr(path)
        totals[routed] += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return totals[True], totals[False]


small = deepseekmoe.get_config("tiny")
small.model.moe.num_experts = 64
if BUDGET == "ci":
    small.model.update(d_model=64, num_layers=2, ffn_dim=128)
    small.model.moe.update(num_experts=16, expert_ffn=32, top_k=4)
models = {f"deepseekmoe:tiny, {small.model.moe.num_experts} experts": small,
          "deepseekmoe:16b": deepseekmoe.get_config("16b")}
expert_sizes = [e for e in (1, 2, 4, 8) if e <= n and n % e == 0]

fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4))
for ax, (name, config) in zip(axes, models.items(), strict=True):
    _, state = abstract_state(config)
    routed, other = map(np.array, zip(*(bytes_per_device(state, e) for e in expert_sizes), strict=True))
    unit, scale = ("GiB", 2**30) if (routed + other).max() > 2**30 else ("MiB", 2**20)
    labels = [str(e) for e in expert_sizes]
    ax.bar(labels, other / scale, label="everything else (replicated)")
    ax.bar(labels, routed / scale, bottom=other / scale, label="routed experts (split over 'expert')")
    ax.set(xlabel="mesh.expert", ylabel=f"{unit} per device (params + Adam)", title=name)
    ax.legend()
    print(f"{name}: " + ", ".join(f"expert={e}: {(r + o) / scale:.2f} {unit}"
                                  for e, r, o in zip(expert_sizes, routed, other, strict=True)))
fig.tight_layout()
plt.show()

# the small model for real: allocate its state sharded on the largest expert axis and measure one device
expert = expert_sizes[-1]
init, state = abstract_state(small)
mesh = make_mesh((n // expert, 1, expert, 1))
real = jax.jit(init, out_shardings=parallel.state_shardings(state, mesh))(jax.random.key(0))
measured = parallel.bytes_per_device(real)
print(f"measured on {devices[0]} with mesh.expert={expert}: {measured / 2**20:.2f} MiB")
assert measured == sum(bytes_per_device(state, expert))
