"""Primitives that act on some axes independently of the others: FFTs,
linear algebra, pooling.

Causal when the scanned axis is one of the batch axes, which they treat
independently: each position's matrices (or signals) are transformed on
their own. Pooling along time is causal with front padding, like a
convolution.
"""
import numpy as np
from jax.extend.core import primitives as P

from scanagram.interpreter import register
from scanagram.kinds import UNSCANNED, is_scanned
from scanagram.rules.common import (SELECTS_OVER_TIME, CausalWindow,
                                    pointwise, replaced_at, window_ahead)

# primitive -> number of trailing axes it acts on
_TRAILING = {
    P.cholesky_p: 2, P.eig_p: 2, P.eigh_p: 2, P.hessenberg_p: 2,
    P.householder_product_p: 2, P.lu_p: 2, P.qr_p: 2, P.schur_p: 2,
    P.svd_p: 2, P.triangular_solve_p: 2, P.tridiagonal_p: 2,
    P.tridiagonal_solve_p: 2,
}


def _batch_axis(e, trailing):
  axes = {k.axis for k in e.in_kinds if is_scanned(k)}
  if len(axes) != 1:
    raise e.refuse(f"its operands are scanned along different axes "
                   f"{sorted(axes)}")
  (axis,) = axes
  for k, a in zip(e.in_kinds, e.in_avals):
    if is_scanned(k) and axis >= a.ndim - trailing:
      raise e.refuse(f"{e.primitive.name} mixes the scanned axis {axis} "
                     f"with the others (it acts on the last {trailing} axes)")
  for a in e.in_avals:
    if a.ndim - trailing <= axis:
      raise e.refuse(f"one operand of {e.primitive.name} has no batch axis "
                     f"{axis}")
  return axis


@register(*_TRAILING)
def linear_algebra_rule(e):
  """Causal when the scanned axis is a batch axis of every operand."""
  axis = _batch_axis(e, _TRAILING[e.primitive])
  return pointwise(e, [axis] * len(e.in_avals), [axis] * len(e.out_avals))


@register(P.fft_p)
def fft_rule(e):
  """Causal when the scanned axis is not among the transformed ones."""
  axis = _batch_axis(e, len(e.params["fft_lengths"]))
  return pointwise(e, [axis], [axis])


@register(P.approx_top_k_p)
def approx_top_k_rule(e):
  """Causal unless it selects along the scanned axis."""
  axis = e.in_kinds[0].axis
  if e.params["reduction_dimension"] % e.in_avals[0].ndim == axis:
    raise e.refuse(f"approx_top_k selects along the scanned axis {axis}"
                   f"{SELECTS_OVER_TIME}")
  return pointwise(e, [axis], [axis] * len(e.out_avals))


@register(P.reduce_window_sum_p, P.reduce_window_max_p, P.reduce_window_min_p,
          P.reduce_window_p)
def reduce_window_rule(e):
  """Pooling: pointwise when its window along the scanned axis is one
  element with no padding; along time (a moving sum, max...) causal with
  stride 1 and front padding covering the window's reach, ``lo >= (K - 1) *
  dilation - ahead``: the state is a ring of the last inputs, as for a
  convolution. (``reduce_window`` with a custom computation takes its
  operands, then their scalar init values.)"""
  n = len(e.out_avals)
  if any(k is not UNSCANNED for k in e.in_kinds[n:]) and (
      e.primitive is P.reduce_window_p):
    raise e.refuse("its init value depends on the scanned input")
  kind = next(k for k in e.in_kinds if is_scanned(k))
  axis, p = kind.axis, e.params
  size, stride = p["window_dimensions"][axis], p["window_strides"][axis]
  (lo, hi), dilation = p["padding"][axis], p["window_dilation"][axis]
  operand_axes = [axis] * n + [None] * (len(e.in_avals) - n)
  if (size, stride, (lo, hi), p["base_dilation"][axis]) == (1, 1, (0, 0), 1):
    return pointwise(e, operand_axes, [axis] * n)
  name = e.primitive.name
  if stride != 1 or p["base_dilation"][axis] != 1:
    raise e.refuse(f"{name} strides or dilates the scanned axis {axis}")
  if n != 1 or any(is_scanned(k) and k.axis != axis for k in e.in_kinds):
    raise e.refuse(f"{name} pools several operands along the scanned axis")
  reach = (size - 1) * dilation
  ahead = window_ahead(e, "the window", axis, kind.ahead, (lo, hi), reach)
  if reach == 0:
    raise e.refuse(f"{name} pads a one-element window along the scanned axis")

  def pool(ins, padding, window_dilation):
    params = dict(p)
    params["padding"] = replaced_at(p["padding"], axis, padding)
    params["window_dilation"] = replaced_at(p["window_dilation"], axis,
                                          window_dilation)
    out = e.primitive.bind(*ins, **params)
    return out[0] if e.primitive.multiple_results else out

  return CausalWindow(e, axis, axis, reach, size, dilation, (lo, hi), ahead,
                      pool, lambda ins: _padding_value(e, ins)).converted()


def _padding_value(e, ins):
  """What the training mode pads a pooling with: its init value."""
  if e.primitive is P.reduce_window_p:
    return ins[1]
  dtype = e.in_avals[0].dtype
  if e.primitive is P.reduce_window_sum_p:
    return np.zeros((), dtype)
  if np.issubdtype(dtype, np.inexact):
    inf = np.array(np.inf, dtype)
    return -inf if e.primitive is P.reduce_window_max_p else inf
  if dtype == np.bool_:
    return np.array(e.primitive is P.reduce_window_min_p)
  info = np.iinfo(dtype)
  return np.array(info.min if e.primitive is P.reduce_window_max_p
                  else info.max, dtype)
