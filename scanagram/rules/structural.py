"""Structural primitives that move, add or drop axes other than time.

Each is causal when it keeps the scanned axis as one whole axis of the
output; the rule computes where it lands.
"""
import math

from jax.extend.core import primitives as P

from scanagram import _jax_internals
from scanagram.interpreter import register
from scanagram.rules.common import (LOOP_OVER_TIME, SCAN_INSTEAD, pointwise,
                                    with_size)
from scanagram.rules.elementwise import scanned_axis


@register(P.broadcast_in_dim_p)
def broadcast_in_dim_rule(e):
  """Causal: the scanned axis maps to ``broadcast_dimensions[axis]``."""
  axis = e.in_kinds[0].axis
  if e.in_avals[0].shape[axis] != e.out_avals[0].shape[
      e.params["broadcast_dimensions"][axis]]:
    raise e.refuse("it broadcasts the scanned axis from size 1")
  out_axis = e.params["broadcast_dimensions"][axis]

  def resize(params, n):
    return dict(params, shape=with_size(params["shape"], out_axis, n))
  return pointwise(e, [axis] + [None] * (len(e.in_avals) - 1), [out_axis],
                   resize)


def reshape_out_axis(in_shape, axis, out_shape):
  """The output axis that is the input's scanned ``axis`` unchanged, or None
  (when the reshape merges or splits it with other axes)."""
  before = math.prod(in_shape[:axis])
  for b in range(len(out_shape)):
    if (math.prod(out_shape[:b]) == before and out_shape[b] == in_shape[axis]):
      return b
  return None


@register(P.reshape_p)
def reshape_rule(e):
  """Causal when the scanned axis stays a whole axis, with only axes before it
  reshaped among themselves (and after it likewise)."""
  axis = e.in_kinds[0].axis
  in_shape, out_shape = e.in_avals[0].shape, e.out_avals[0].shape
  out_axis = reshape_out_axis(in_shape, axis, out_shape)
  if out_axis is None or e.params.get("dimensions") is not None:
    raise e.refuse(
        f"it reshapes {in_shape} to {out_shape}, merging the scanned axis "
        f"{axis} with other axes")

  def resize(params, n):
    return dict(params, new_sizes=with_size(params["new_sizes"], out_axis, n))
  return pointwise(e, [axis] + [None] * (len(e.in_avals) - 1), [out_axis],
                   resize)


@register(P.transpose_p)
def transpose_rule(e):
  """Causal: the scanned axis moves to its place in the permutation."""
  axis = e.in_kinds[0].axis
  return pointwise(e, [axis], [list(e.params["permutation"]).index(axis)])


@register(P.squeeze_p)
def squeeze_rule(e):
  """Causal unless it squeezes the scanned axis itself."""
  axis = e.in_kinds[0].axis
  dims = [d % e.in_avals[0].ndim for d in e.params["dimensions"]]
  if axis in dims:
    raise e.refuse("it squeezes away the scanned axis, reading one position "
                   f"of the sequence (`x[t]`). {LOOP_OVER_TIME}")
  return pointwise(e, [axis], [axis - sum(d < axis for d in dims)])


@register(P.rev_p)
def rev_rule(e):
  """Causal unless it reverses the scanned axis."""
  axis = e.in_kinds[0].axis
  if axis in e.params["dimensions"]:
    raise e.refuse(f"it reverses the scanned axis {axis}: element t would "
                   "need the last element of the sequence")
  return pointwise(e, [axis], [axis])


@register(P.dynamic_slice_p)
def dynamic_slice_rule(e):
  """Causal when the slice takes the whole scanned axis (start indices are
  then clamped to 0 along it)."""
  axis = scanned_axis(e)
  if e.params["slice_sizes"][axis] != e.in_avals[0].shape[axis]:
    raise e.refuse(
        f"it takes a window of {e.params['slice_sizes'][axis]} of the "
        f"{e.in_avals[0].shape[axis]} elements along the scanned axis {axis} "
        f"at the position its start index gives. {LOOP_OVER_TIME}")

  def resize(params, n):
    return dict(params, slice_sizes=with_size(params["slice_sizes"], axis, n))
  return pointwise(e, [axis] + [None] * (len(e.in_avals) - 1), [axis], resize)


@register(P.dynamic_update_slice_p)
def dynamic_update_slice_rule(e):
  """Causal when the update covers the whole scanned axis."""
  axis = scanned_axis(e)
  operand, update = e.in_avals[:2]
  if update.shape[axis] != operand.shape[axis]:
    raise e.refuse(
        f"it writes {update.shape[axis]} of the {operand.shape[axis]} "
        f"elements along the scanned axis {axis} at a position. "
        f"{LOOP_OVER_TIME}")
  return pointwise(e, [axis, axis] + [None] * (len(e.in_avals) - 2), [axis])


@register(_jax_internals.stack_p)
def stack_rule(e):
  """Causal: stacking inserts a new axis, the scanned one moves past it when
  it comes at or after ``axis``."""
  axis = scanned_axis(e)
  new = e.params["axis"]
  return pointwise(e, [axis] * len(e.in_avals), [axis + (axis >= new)])


@register(_jax_internals.unstack_p)
def unstack_rule(e):
  """Causal unless it unstacks along the scanned axis (each piece would be
  one position of the sequence)."""
  axis = e.in_kinds[0].axis
  gone = e.params["axis"]
  if gone == axis:
    raise e.refuse(f"it unstacks the scanned axis {axis} into one value per "
                   "position, as a Python loop over time or "
                   f"`hk.static_unroll` does. Write the loop as {SCAN_INSTEAD}")
  return pointwise(e, [axis], [axis - (axis > gone)] * len(e.out_avals))


@register(_jax_internals.tile_p)
def tile_rule(e):
  """Causal unless it repeats the scanned axis (``reps`` > 1 along it)."""
  axis = e.in_kinds[0].axis
  if e.params["reps"][axis] != 1:
    raise e.refuse(f"it repeats the whole sequence along the scanned axis "
                   f"{axis} {e.params['reps'][axis]} times")
  return pointwise(e, [axis], [axis])
