"""Slicing, padding, concatenation and splitting.

Along other axes these are pointwise. Along the scanned axis they shift the
sequence: ``pad`` at the front or ``concatenate([zeros, xs])`` delays it (the
result runs *ahead* of the input; the delay line that realigns it later joins
the carry), a slice starting at s moves it back by s. A shift that would need
a future element (``xs[1:]``, negative front padding) is refused.
"""
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram import _jax_internals
from scanagram.interpreter import needs_length, register, stateless
from scanagram.kinds import UNSCANNED, Scanned
from scanagram.rules.common import LOOP_OVER_TIME, pointwise, with_size
from scanagram.rules.elementwise import scanned_axis


# strided slices and interleaving pads along time are how lax.associative_scan
# is traced
_ASSOCIATIVE_SCAN_HINT = (
    " (if this is lax.associative_scan, use scanagram.associative_scan: the "
    "same function, and it converts)")


def _future(e, axis, steps, what, advice=""):
  return e.refuse(
      f"{what} along the scanned axis {axis}: element t would need element "
      f"t + {steps} of its input, a future element{advice}")


@register(P.slice_p)
def slice_rule(e):
  """Along other axes: pointwise. Along the scanned axis: causal when the
  slice starts no later than the input runs ahead, with stride 1."""
  kind = e.in_kinds[0]
  axis, start = kind.axis, e.params["start_indices"][kind.axis]
  limit = e.params["limit_indices"][axis]
  strides = e.params.get("strides") or (1,) * e.in_avals[0].ndim
  if strides[axis] != 1:
    raise e.refuse(f"it takes one element in every {strides[axis]} along the "
                   f"scanned axis {axis}{_ASSOCIATIVE_SCAN_HINT}")
  if start == 0 and limit == e.in_avals[0].shape[axis]:
    def resize(params, n):
      return dict(params,
                  limit_indices=with_size(params["limit_indices"], axis, n))
    return pointwise(e, [axis], [axis], resize)
  if start > kind.ahead:
    # a Python loop over time reads one element per iteration and is
    # refused at the first element past what the input holds
    loop = limit - start == 1 and start == kind.ahead + 1
    raise _future(e, axis, start - kind.ahead, f"it starts at element {start}",
                  f". {LOOP_OVER_TIME}" if loop else "")
  ahead = kind.ahead - start
  size = e.out_avals[0].shape[axis]
  others = dict(e.params)

  def apply(ctx, ins):
    (x,) = ins
    if ctx.fresh:   # x holds elements 0.., the slice from `start`
      _, n = ctx.span(size, ahead)
      x = lax.slice_in_dim(x, start, start + n, axis=axis)
    # else the elements x holds are those the slice holds
    return [_slice_other_axes(x, others, axis)]
  return stateless([Scanned(axis, ahead)], apply)


def _slice_other_axes(x, params, axis):
  starts = list(params["start_indices"])
  limits = list(params["limit_indices"])
  strides = list(params.get("strides") or (1,) * x.ndim)
  starts[axis], limits[axis], strides[axis] = 0, x.shape[axis], 1
  return lax.slice(x, starts, limits, strides)


def _past_end_select(ctx, x, axis, ahead, end, fill):
  """``fill`` instead of ``x`` at the elements past ``end``: the training
  mode has padding (or a constant suffix) there, the block has run on.
  ``fill`` is a scalar or holds the block's elements."""
  needs_length("padding at the end of the sequence")
  first, n = ctx.span(end, ahead)
  past = (first + jnp.arange(n) >= end).reshape(
      [n if d == axis else 1 for d in range(x.ndim)])
  return jnp.where(past, fill, x)


@register(P.pad_p)
def pad_rule(e):
  """Along other axes: pointwise. Along the scanned axis: padding ``lo`` at
  the front delays the sequence by lo (causal when lo >= -ahead); interior
  padding is refused."""
  kind = e.in_kinds[0]
  if e.in_kinds[1] is not UNSCANNED:
    raise e.refuse("its padding value depends on the scanned input")
  axis = kind.axis
  lo, hi, interior = e.params["padding_config"][axis]
  if (lo, hi, interior) == (0, 0, 0):
    return pointwise(e, [axis, None], [axis])
  if interior:
    raise e.refuse(f"it pads between the elements of the scanned axis {axis}"
                   f"{_ASSOCIATIVE_SCAN_HINT}")
  if kind.ahead + lo < 0:
    raise _future(e, axis, -(kind.ahead + lo), f"it removes {-lo} elements "
                  "from the front")
  ahead = kind.ahead + lo
  size = e.out_avals[0].shape[axis]
  end = e.in_avals[0].shape[axis] + lo  # output positions past it are padding
  others = [tuple(c) for c in e.params["padding_config"]]

  def apply(ctx, ins):
    x, value = ins
    config = list(others)
    if not ctx.fresh:   # x holds the elements the output holds
      config[axis] = (0, 0, 0)
      y = lax.pad(x, value, config)
      return [_past_end_select(ctx, y, axis, ahead, end, value)
              if hi > 0 else y]
    config[axis] = (lo, max(hi, 0), 0)
    y = lax.pad(x, value, config)
    _, n = ctx.span(size, ahead)
    return [lax.slice_in_dim(y, 0, n, axis=axis)]
  return stateless([Scanned(axis, ahead)], apply)


@register(P.concatenate_p)
def concatenate_rule(e):
  """Along other axes: pointwise. Along the scanned axis: one scanned operand
  after constant ones delays the sequence by their length."""
  dim = e.params["dimension"]
  scanned = [i for i, k in enumerate(e.in_kinds) if k is not UNSCANNED]
  axis = scanned_axis(e)
  if dim != axis:
    return pointwise(e, [axis] * len(e.in_avals), [axis])
  if len(scanned) > 1:
    raise e.refuse(f"it joins {len(scanned)} sequences along the scanned axis "
                   f"{axis}: the later ones would need future elements")
  (j,) = scanned
  kind = e.in_kinds[j]
  offset = sum(a.shape[axis] for a in e.in_avals[:j])
  ahead = kind.ahead + offset
  end = offset + e.in_avals[j].shape[axis]
  size = e.out_avals[0].shape[axis]
  has_suffix = j + 1 < len(e.in_avals)

  def apply(ctx, ins):
    if ctx.fresh:
      y = lax.concatenate(list(ins), dim)
      _, n = ctx.span(size, ahead)
      return [lax.slice_in_dim(y, 0, n, axis=axis)]
    x = ins[j]
    if has_suffix:
      suffix = lax.concatenate(list(ins[j + 1:]), dim)
      first, n = ctx.span(size, ahead)
      index = jnp.clip(first - end + jnp.arange(n), 0, suffix.shape[axis] - 1)
      after = jnp.take(suffix, index, axis=axis)
      x = _past_end_select(ctx, x, axis, ahead, end, after)
    return [x]
  return stateless([Scanned(axis, ahead)], apply)


@register(_jax_internals.split_p)
def split_rule(e):
  """Along other axes: pointwise. Along the scanned axis: each piece is a
  slice, causal when it starts no later than the input runs ahead."""
  kind = e.in_kinds[0]
  axis = kind.axis
  if e.params["axis"] != axis:
    return pointwise(e, [axis], [axis] * len(e.out_avals))
  starts, total = [], 0
  for s in e.params["sizes"]:
    starts.append(total)
    total += s
  for k, s in enumerate(starts):
    if s > kind.ahead and e.params["sizes"][k]:
      raise _future(e, axis, s - kind.ahead, f"piece {k} starts at element {s}")
  aheads = [kind.ahead - s for s in starts]
  sizes = e.params["sizes"]

  def apply(ctx, ins):
    (x,) = ins
    if not ctx.fresh:
      return [x] * len(sizes)
    return [lax.slice_in_dim(x, s, s + ctx.span(n, a)[1], axis=axis)
            for s, n, a in zip(starts, sizes, aheads)]
  return stateless([Scanned(axis, a) for a in aheads], apply)
