"""Contractions and convolutions.

``dot_general`` is causal when it does not contract the scanned axis and does
not pair two different positions of the sequence (unless it is attention:
:mod:`scanagram.rules.attention`). ``conv_general_dilated`` along the scanned
spatial axis is causal with enough front padding; the step keeps a ring of
the last (K - 1) * dilation inputs per convolution, as Fast WaveNet does.
"""
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram.interpreter import Converted, register
from scanagram.kinds import UNSCANNED, Scanned, is_scanned
from scanagram.rules.common import DelayLine, pointwise


def _dot_out_axis(dims, side, axis, ndims):
  """Output axis of operand ``side``'s non-contracted ``axis``."""
  (contract, batch) = dims
  if axis in batch[side]:
    return batch[side].index(axis)
  free = [d for d in range(ndims[side])
          if d not in contract[side] and d not in batch[side]]
  offset = len(batch[0]) + (0 if side == 0 else
                            ndims[0] - len(contract[0]) - len(batch[0]))
  return offset + free.index(axis)


@register(P.dot_general_p)
def dot_general_rule(e):
  """Causal when no scanned axis is contracted and, if both operands are
  scanned, their scanned axes are paired batch dimensions."""
  from scanagram.rules import attention
  if attention.is_attention_contraction(e):
    return attention.dot_general_rule(e)
  (contract, batch) = e.params["dimension_numbers"]
  ndims = [a.ndim for a in e.in_avals]
  axes = [k.axis if is_scanned(k) else None for k in e.in_kinds]
  for side in (0, 1):
    if axes[side] is not None and axes[side] in contract[side]:
      raise e.refuse(f"dot_general contracts over the scanned axis "
                     f"{axes[side]} of its {'lhs' if side == 0 else 'rhs'}")
  if all(a is not None for a in axes):
    if not (axes[0] in batch[0] and axes[1] in batch[1] and
            batch[0].index(axes[0]) == batch[1].index(axes[1])):
      raise e.refuse(
          "dot_general pairs every position of one sequence with every "
          "position of another (an outer product over time) and no causal "
          "mask follows it")
  side = 0 if axes[0] is not None else 1
  out_axis = _dot_out_axis((contract, batch), side, axes[side], ndims)
  other = 1 - side
  if axes[other] is None and axes[side] in batch[side]:
    # the unscanned operand's paired batch axis runs along time too
    axes[other] = batch[other][batch[side].index(axes[side])]
  return pointwise(e, axes, [out_axis])


@register(P.conv_general_dilated_p)
def conv_rule(e):
  """Causal along the scanned spatial axis s when the stride and input
  dilation along s are 1 and the front padding covers the kernel's reach,
  ``lo >= (K - 1) * dilation - ahead``; pointwise when scanned along batch."""
  lhs_kind, rhs_kind = e.in_kinds
  if rhs_kind is not UNSCANNED:
    raise e.refuse("its kernel depends on the scanned input")
  dn = e.params["dimension_numbers"]
  axis = lhs_kind.axis
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  if axis == lhs_spec[0]:
    if e.params["batch_group_count"] != 1:
      raise e.refuse("it groups the batch axis, which is the scanned axis")
    return pointwise(e, [axis, None], [out_spec[0]])
  if axis == lhs_spec[1]:
    raise e.refuse(f"it mixes the features axis, which is the scanned axis "
                   f"{axis}")
  k = list(lhs_spec[2:]).index(axis)
  out_axis = out_spec[2 + k]
  if e.params["window_strides"][k] != 1 or e.params["lhs_dilation"][k] != 1:
    raise e.refuse(f"it strides or dilates the input along the scanned axis "
                   f"{axis}")
  size = e.in_avals[1].shape[rhs_spec[2 + k]]
  dilation = e.params["rhs_dilation"][k]
  reach = (size - 1) * dilation
  lo, hi = e.params["padding"][k]
  ahead = lhs_kind.ahead + lo - reach
  if ahead < 0:
    raise e.refuse(
        f"its padding along the scanned axis {axis} is ({lo}, {hi}) but the "
        f"kernel reaches {reach} elements: element t would need element "
        f"t + {-ahead} of the input (causal padding is ({reach}, 0))")
  if reach == 0:
    if (lo, hi) != (0, 0):
      raise e.refuse("a size-1 kernel with padding along the scanned axis")
    return pointwise(e, [axis, None], [out_axis])
  return _CausalConv(e, axis, k, out_axis, reach, dilation, size, lo, hi,
                     ahead).converted()


class _CausalConv:
  """A convolution along time. State: a ring of the last ``reach`` elements of
  the front-padded input, indexed by position modulo ``reach``."""

  def __init__(self, e, axis, k, out_axis, reach, dilation, size, lo, hi,
               ahead):
    self.e, self.axis, self.k, self.out_axis = e, axis, k, out_axis
    self.reach, self.dilation, self.size = reach, dilation, size
    self.lo, self.hi, self.ahead = lo, hi, ahead
    self.in_size = e.in_avals[0].shape[axis]
    self.out_size = e.out_avals[0].shape[out_axis]

  def converted(self):
    return Converted([Scanned(self.out_axis, self.ahead)], self.prefill,
                     self.step, True)

  def _conv(self, x, w, padding, dilation):
    params = dict(self.e.params)
    pad = list(params["padding"])
    pad[self.k] = padding
    dil = list(params["rhs_dilation"])
    dil[self.k] = dilation
    params.update(padding=tuple(pad), rhs_dilation=tuple(dil))
    return P.conv_general_dilated_p.bind(x, w, **params)

  def prefill(self, ctx, ins):
    x, w = ins
    y = self._conv(x, w, (self.lo, max(self.hi, 0)), self.dilation)
    _, n = ctx.block(self.out_size, self.ahead)
    y = lax.slice_in_dim(y, 0, n, axis=self.out_axis)
    # the ring: the last `reach` elements of the front-padded input
    widths = [(0, 0)] * x.ndim
    widths[self.axis] = (self.lo, 0)
    padded = jnp.pad(x, widths)
    length = padded.shape[self.axis]
    if length < self.reach:
      widths[self.axis] = (self.reach - length, 0)
      padded, length = jnp.pad(padded, widths), self.reach
    last = lax.slice_in_dim(padded, length - self.reach, None, axis=self.axis)
    ring = jnp.roll(last, (length - self.reach) % self.reach, axis=self.axis)
    return ring, [y]

  def step(self, ctx, ring, ins):
    x, w = ins
    newest = ctx.position + self.ahead + self.reach  # index in padded input
    if self.hi > 0:  # past the input's end the training mode sees padding
      x = jnp.where(newest - self.lo >= self.in_size, jnp.zeros_like(x), x)
    taps = []
    for j in range(self.size - 1, 0, -1):
      slot = jnp.mod(newest - j * self.dilation, self.reach)
      taps.append(lax.dynamic_slice_in_dim(ring, slot, 1, self.axis))
    taps.append(x)
    window = lax.concatenate(taps, self.axis)
    ring = lax.dynamic_update_slice_in_dim(
        ring, x, jnp.mod(newest, self.reach), self.axis)
    return ring, [self._conv(window, w, (0, 0), 1)]
