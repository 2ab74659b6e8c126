"""Primitives that act on trailing axes only: FFTs and linear algebra.

Causal when the scanned axis is one of the leading batch axes, which they
treat independently: each position's matrices (or signals) are transformed
on their own.
"""
from jax.extend.core import primitives as P

from scanagram.interpreter import register
from scanagram.kinds import UNSCANNED, is_scanned
from scanagram.rules.common import pointwise

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
    raise e.refuse(f"approx_top_k selects along the scanned axis {axis}")
  return pointwise(e, [axis], [axis] * len(e.out_avals))


@register(P.reduce_window_sum_p, P.reduce_window_max_p, P.reduce_window_min_p,
          P.reduce_window_p)
def reduce_window_rule(e):
  """Pooling: causal when its window along the scanned axis is one element
  with stride 1 and no padding there. (``reduce_window`` with a custom
  computation takes its operands, then their scalar init values.)"""
  n = len(e.out_avals)
  if any(k is not UNSCANNED for k in e.in_kinds[n:]) and (
      e.primitive is P.reduce_window_p):
    raise e.refuse("its init value depends on the scanned input")
  axis = next(k.axis for k in e.in_kinds if is_scanned(k))
  p = e.params
  if (p["window_dimensions"][axis], p["window_strides"][axis],
      tuple(p["padding"][axis]), p["base_dilation"][axis],
      p["window_dilation"][axis]) != (1, 1, (0, 0), 1, 1):
    raise e.refuse(f"{e.primitive.name} pools along the scanned axis {axis}")
  if e.primitive is P.reduce_window_p:
    return pointwise(e, [axis] * n + [None] * n, [axis] * n)
  return pointwise(e, [axis], [axis])
