"""Reductions, sorting and cumulative ops.

Over other axes they are pointwise. A reduction, sort or top_k over the
scanned axis needs the whole sequence and is refused. A forward cumulative op
along the scanned axis is causal: its running value joins the carry.
"""
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram.interpreter import Converted, register
from scanagram.kinds import Scanned
from scanagram.rules.common import SELECTS_OVER_TIME, last_real, pointwise
from scanagram.rules.elementwise import scanned_axis

_REDUCE = [P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p,
           P.reduce_and_p, P.reduce_or_p, P.reduce_xor_p, P.argmax_p,
           P.argmin_p]
_VERB = {"reduce_sum": "sums", "reduce_max": "takes the maximum",
         "reduce_min": "takes the minimum", "reduce_prod": "multiplies",
         "argmax": "takes the argmax", "argmin": "takes the argmin"}


def _reduced_out_axis(e, axis, reduced):
  reduced = [d % e.in_avals[0].ndim for d in reduced]
  if axis in reduced:
    verb = _VERB.get(e.primitive.name, "reduces")
    raise e.refuse(f"{e.primitive.name} {verb} over the scanned axis {axis}")
  return axis - sum(d < axis for d in reduced)


@register(*_REDUCE)
def reduce_rule(e):
  """Causal unless the scanned axis is among the reduced ``axes``."""
  axis = e.in_kinds[0].axis
  out_axis = _reduced_out_axis(e, axis, e.params["axes"])
  return pointwise(e, [axis], [out_axis])


@register(P.reduce_p)
def reduce_computation_rule(e):
  """``lax.reduce`` with a custom computation: causal unless it reduces over
  the scanned axis. Operands come first, then their scalar init values."""
  n = len(e.in_avals) // 2
  axis = scanned_axis(e)
  if any(k is not None and hasattr(k, "axis") for k in e.in_kinds[n:]):
    raise e.refuse("its init value depends on the scanned input")
  out_axis = _reduced_out_axis(e, axis, e.params["dimensions"])
  return pointwise(e, [axis] * n + [None] * n, [out_axis] * n)


@register(P.sort_p)
def sort_rule(e):
  """Causal unless it sorts along the scanned axis."""
  axis = scanned_axis(e)
  if e.params["dimension"] % e.in_avals[0].ndim == axis:
    raise e.refuse(f"sort sorts along the scanned axis {axis}"
                   f"{SELECTS_OVER_TIME}")
  return pointwise(e, [axis] * len(e.in_avals), [axis] * len(e.out_avals))


@register(P.top_k_p)
def top_k_rule(e):
  """Causal unless it selects along the scanned axis."""
  axis = e.in_kinds[0].axis
  ndim = e.in_avals[0].ndim
  k_axis = e.params.get("axis", ndim - 1) % ndim
  if k_axis == axis:
    raise e.refuse(f"top_k selects along the scanned axis {axis}"
                   f"{SELECTS_OVER_TIME}")
  return pointwise(e, [axis], [axis, axis])


def _identity(name, dtype):
  dtype = np.dtype(dtype)
  if name == "cumsum":
    return np.zeros((), dtype)
  if name == "cumprod":
    return np.ones((), dtype)
  low = -np.inf if jnp.issubdtype(dtype, jnp.inexact) else np.iinfo(dtype).min
  high = np.inf if jnp.issubdtype(dtype, jnp.inexact) else np.iinfo(dtype).max
  if name in ("cummax", "cumlogsumexp"):
    return np.array(low, dtype)
  return np.array(high, dtype)


_COMBINE = {"cumsum": lax.add, "cumprod": lax.mul, "cummax": lax.max,
            "cummin": lax.min, "cumlogsumexp": jnp.logaddexp}


@register(P.cumsum_p, P.cumprod_p, P.cummax_p, P.cummin_p, P.cumlogsumexp_p)
def cumulative_rule(e):
  """Over other axes: pointwise. Along the scanned axis: causal in the
  forward direction; the running value is the state. ``reverse`` along the
  scanned axis is refused."""
  kind = e.in_kinds[0]
  axis = kind.axis
  if e.params["axis"] % e.in_avals[0].ndim != axis:
    return pointwise(e, [axis], [axis])
  name = e.primitive.name
  if e.params["reverse"]:
    raise e.refuse(f"{name} runs in reverse along the scanned axis {axis}: "
                   "element t would need the elements after it")
  combine = _COMBINE[name]
  shape = list(e.in_avals[0].shape)
  shape[axis] = 1
  identity = _identity(name, e.in_avals[0].dtype)

  def advance(ctx, running, ins):
    (x,) = ins
    if running is None:
      running = jnp.full(shape, identity)
    if x.shape[axis] == 0:
      return running, [x]
    y = combine(running, e.primitive.bind(x, **e.params))
    return last_real(ctx, y, axis, kind.ahead, running), [y]
  return Converted([Scanned(axis, kind.ahead)], advance, True)
