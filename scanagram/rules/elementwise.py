"""Elementwise primitives: causal whenever every scanned operand is scanned
along the same axis (each output element depends on the same position only).

Unscanned operands of full length (a learned position table, a constant mask)
are sliced to the current position; scalars pass through.
"""
from jax.extend.core import primitives as P

from scanagram.interpreter import (ELEMENTWISE_PRIMITIVES, bind, register,
                                   stateless)
from scanagram.kinds import UNSCANNED
from scanagram.rules.common import pointwise, scanned_operands

_NAMES = """
abs acos acosh add add_jaxvals and asin asinh atan atan2 atanh bessel_i0e bessel_i1e
cbrt ceil clamp clz complex conj convert_element_type copy cos cosh digamma div
eq eq_to erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igamma_grad_a igammac imag
integer_pow is_finite le le_to lgamma log log1p logistic lt lt_to max min mul ne neg
nextafter not or polygamma population_count pow real reduce_precision
regularized_incomplete_beta rem round rsqrt select_n shift_left
shift_right_arithmetic shift_right_logical sign sin sinh sqrt square
stop_gradient sub tan tanh xor zeta name threefry2x32
""".split()
ELEMENTWISE = [getattr(P, n + "_p") for n in _NAMES]
ELEMENTWISE_PRIMITIVES.update(ELEMENTWISE)


def scanned_axis(e):
  """The one axis along which all scanned operands run, or refuse."""
  axes = sorted({e.in_kinds[i].axis for i in scanned_operands(e)})
  if len(axes) != 1:
    raise e.refuse(
        f"it combines values scanned along different axes {axes}: element t "
        "of one meets other positions of the other")
  return axes[0]


@register(*ELEMENTWISE)
def elementwise_rule(e):
  """Causal when all scanned operands share their scanned axis."""
  axis = scanned_axis(e)
  return pointwise(e, broadcast_operand_axes(e, axis), [axis] * len(e.out_avals))


def broadcast_operand_axes(e, axis):
  """Each operand's time axis, or None for scalars and unscanned operands of
  size 1 along it (lax broadcasts size-1 axes). A scanned operand of size 1
  along it (``xs[:1] + xs``) would meet every position: refused."""
  size = e.out_avals[0].shape[axis]
  for k, a in zip(e.in_kinds, e.in_avals):
    if k is not UNSCANNED and a.ndim and a.shape[axis] == 1 and size != 1:
      raise e.refuse(
          "it broadcasts a sequence of one element along the scanned axis "
          f"{axis} over all {size} positions")
  return [None if a.ndim == 0 or (a.shape[axis] == 1 and size != 1) else axis
          for a in e.in_avals]


@register(P.bitcast_convert_type_p)
def bitcast_rule(e):
  """Causal unless the scanned axis is the trailing axis of bytes that a
  narrower input type packs into a wider output element."""
  axis = scanned_axis(e)
  if e.in_avals[0].ndim > e.out_avals[0].ndim and (
      axis == e.in_avals[0].ndim - 1):
    raise e.refuse("it reinterprets the scanned axis as bytes of another type")
  return pointwise(e, [axis], [axis])


@register(P.device_put_p)
def device_put_rule(e):
  """Moves each operand unchanged: causal; every output keeps its operand's
  kind."""
  return stateless(e.in_kinds, lambda ctx, ins: bind(e.eqn, ins))
