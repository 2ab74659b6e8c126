"""``convert_as``: a function the conversion cannot look into (a fused
kernel, an FFI call) or should not (a hand-optimised implementation),
converted as a plain-JAX reference with the same outputs.

``@scanagram.convert_as(reference) def fast(...)``: ``fast`` runs wherever
the function runs (eagerly, under ``jit``, ``grad`` and ``vmap``); the
conversion converts ``reference`` in its place, after checking that the two
agree on the example (or a random instance of it). It binds one primitive,
``convert_as``, whose operands are the values each function closes over,
then the leaves of the arguments.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from scanagram import _call_primitives, _jax_internals
from scanagram.interpreter import register
from scanagram.rules.calls import convert_call


def convert_as(reference: Callable, *, rtol: float = 1e-4,
               atol: float = 1e-4) -> Callable:
  """A decorator: the decorated function runs as itself, and converts as
  ``reference``.

  Args:
    reference: plain JAX computing the same outputs from the same arguments
      (a pytree of the same structure, shapes and dtypes).
    rtol, atol: how close the two must be on the check at conversion time
      (``numpy.allclose``); further apart, the conversion is refused,
      naming both functions.

  Example (a Pallas kernel: ``fast`` could be any ``pallas_call``)::

    def attention(q, k, v):            # plain JAX: converts to a KV cache
      s = jnp.einsum("bqd,bkd->bqk", q, k)
      s = jnp.where(jnp.tril(jnp.ones(s.shape[1:], bool)), s, -jnp.inf)
      return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, -1), v)

    @scanagram.convert_as(attention)
    def flash_attention(q, k, v):
      return pl.pallas_call(kernel, ...)(q, k, v)
  """
  def decorate(fast: Callable) -> Callable:
    @functools.wraps(fast)
    def wrapped(*args, **kwargs):
      leaves, in_tree = jax.tree.flatten(args)
      specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
               for x in leaves]
      fast_jaxpr, fast_consts, out_tree = _traced(fast, in_tree, specs,
                                                  kwargs)
      ref_jaxpr, ref_consts, ref_tree = _traced(reference, in_tree, specs,
                                                kwargs)
      names = (_name(fast), _name(reference))
      if ref_tree != out_tree or [(a.shape, a.dtype) for a in
                                  ref_jaxpr.out_avals] != [
          (a.shape, a.dtype) for a in fast_jaxpr.out_avals]:
        raise TypeError(
            f"convert_as: {names[1]} must give what {names[0]} gives; got "
            f"{_outputs(ref_jaxpr, ref_tree)} from {names[1]} and "
            f"{_outputs(fast_jaxpr, out_tree)} from {names[0]}")
      outs = convert_as_p.bind(
          *fast_consts, *ref_consts, *leaves, fast=fast_jaxpr,
          reference=ref_jaxpr, n_fast=len(fast_consts),
          n_reference=len(ref_consts), names=names, tolerance=(rtol, atol))
      return jax.tree.unflatten(out_tree, outs)
    wrapped.reference = reference
    return wrapped
  return decorate


def _traced(fun, in_tree, specs, kwargs):
  """``(ClosedJaxpr taking consts then leaves, consts, output tree)``."""
  out_tree = []

  def flat(*leaves):
    out = fun(*jax.tree.unflatten(in_tree, leaves), **kwargs)
    out_leaves, tree = jax.tree.flatten(out)
    out_tree.append(tree)
    return out_leaves
  closed = jax.make_jaxpr(flat)(*specs)
  # values it closes over (possibly tracers) become operands
  body = jex_core.ClosedJaxpr(
      _jax_internals.convert_constvars_jaxpr(closed.jaxpr), ())
  return body, list(closed.consts), out_tree[0]


def _name(fun) -> str:
  return getattr(fun, "__qualname__", None) or getattr(
      fun, "__name__", repr(fun))


def _outputs(closed, tree) -> str:
  shapes = [f"{a.dtype}{list(a.shape)}" for a in closed.out_avals]
  return f"{jax.tree.unflatten(tree, shapes)}"


_jax_internals.exclude_from_user_frames(__file__)  # errors name the caller
convert_as_p = jex_core.Primitive("convert_as")


def _run_fast(*operands, fast, n_fast, n_reference, **_):
  """What the primitive computes: the fast function."""
  args = operands[n_fast + n_reference:]
  return jex_core.jaxpr_as_fun(fast)(*operands[:n_fast], *args)


def _batch(operands, dims, *, fast, reference, n_fast, n_reference, names,
           tolerance):
  """vmap keeps the primitive: both functions are vmapped over the batch
  axis (moved first), so a vmapped layer still converts as its reference."""
  n = n_fast + n_reference
  consts, const_axes, leaves = _call_primitives.batch_first(operands, dims, n)
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  fast_inner, fast = _call_primitives.vmapped(
      fast, const_axes[:n_fast], consts[:n_fast], specs)
  ref_inner, reference = _call_primitives.vmapped(
      reference, const_axes[n_fast:], consts[n_fast:], specs)
  outs = convert_as_p.bind(
      *fast_inner, *consts[:n_fast], *ref_inner, *consts[n_fast:], *leaves,
      fast=fast, reference=reference, n_fast=len(fast_inner) + n_fast,
      n_reference=len(ref_inner) + n_reference, names=names,
      tolerance=tolerance)
  return outs, [0] * len(outs)


_call_primitives.define(convert_as_p, _run_fast,
                        lambda *_, fast, **__: fast.out_avals, _batch)


@register(convert_as_p)
def convert_as_rule(e):
  """Causal when the reference is: converts the reference, after checking
  that it computes what the fast function does on the example's constants
  where they are known and on random values where they are not."""
  p = e.params
  n_fast, n_reference = p["n_fast"], p["n_reference"]
  fast_name, ref_name = p["names"]
  n = n_fast + n_reference
  rng = np.random.default_rng(0)
  values = []
  for i, aval in enumerate(e.in_avals):
    value = e.known(i)
    values.append(_random(rng, aval) if value is None else value)
  fast_args = values[:n_fast] + values[n:]
  ref_args = values[n_fast:n] + values[n:]
  try:
    got = jax.jit(jex_core.jaxpr_as_fun(p["fast"]))(*fast_args)
    want = jax.jit(jex_core.jaxpr_as_fun(p["reference"]))(*ref_args)
  except Exception as err:   # noqa: BLE001  (a kernel that cannot run here)
    raise e.refuse(f"convert_as could not compare {fast_name} with its "
                   f"reference {ref_name} on a random instance of the "
                   f"example: {type(err).__name__}: {err}") from None
  rtol, atol = p["tolerance"]
  for j, (a, b) in enumerate(zip(got, want)):
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
      worst = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
      raise e.refuse(
          f"{fast_name} and its reference {ref_name} differ on a random "
          f"instance of the example (output {j}: by up to {worst:.3g}, "
          f"beyond rtol={rtol}, atol={atol}): the conversion would derive "
          f"the step of a different function. Fix the reference, or pass "
          f"convert_as(..., rtol=, atol=) if the difference is rounding")
  return convert_call(e, p["reference"],
                      picked=list(range(n_fast, len(e.in_kinds))))


def _random(rng, aval):
  """Random values of ``aval``'s shape and dtype: normal floats, small
  non-negative integers, random booleans."""
  dtype = aval.dtype
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.asarray(rng.standard_normal(aval.shape), dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return jnp.asarray(rng.integers(0, 4, aval.shape), dtype)
  if jnp.issubdtype(dtype, jnp.bool_):
    return jnp.asarray(rng.random(aval.shape) < 0.5)
  return jnp.zeros(aval.shape, dtype)


__all__ = ["convert_as", "convert_as_p"]
