"""Helpers for shard_map's varying-manual-axes types, for loops and custom VJPs that run inside shard_map.

Outside shard_map every array varies over no manual axis and these helpers do nothing.
"""
import jax


def varying_axes(x: jax.Array) -> set[str]:
    """The shard_map axes x varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax 0.10
    return set(manual.varying if manual is not None else getattr(aval, "vma", ()))


def varying_like(x: jax.Array, *others: jax.Array) -> jax.Array:
    """x marked as varying over every axis any of ``others`` varies over (a loop carry must have the type of the
    loop body's output)."""
    axes = set().union(*(varying_axes(o) for o in others)) - varying_axes(x)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def sum_to_type(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """A custom VJP's cotangent summed over the axes it varies over but its primal does not: the transpose of
    using one (invariant) value on every device of those axes."""
    axes = varying_axes(grad) - varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(axes))) if axes else grad


def unify(*xs: jax.Array) -> list[jax.Array]:
    """Every x marked as varying over the union of their axes (the inputs of one kernel call)."""
    return [varying_like(x, *xs) for x in xs]


def out_struct(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """The out_shape of a pallas_call whose inputs have ``like``'s type: inside shard_map it must say which
    manual axes the output varies over."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=getattr(jax.typeof(like), "manual_axis_type", None))
