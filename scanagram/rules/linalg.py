"""Contractions and convolutions.

``dot_general`` is causal when it does not contract the scanned axis and does
not pair two different positions of the sequence. (Attention's contractions
are :mod:`scanagram.rules.attention`'s; its ``dot_general`` rule hands every
other contraction to :func:`dot_general_rule` here.) ``conv_general_dilated`` along the scanned
spatial axis is causal with enough front padding; the step keeps a ring of
the last (K - 1) * dilation inputs per convolution, as Fast WaveNet does.
"""
from jax.extend.core import primitives as P

from scanagram.interpreter import register
from scanagram.kinds import UNSCANNED, is_scanned
from scanagram.rules.common import (CausalWindow, dot_out_axis, pointwise,
                                    replaced_at, window_ahead)


def dot_general_rule(e):
  """Causal when no scanned axis is contracted and, if both operands are
  scanned, their scanned axes are paired batch dimensions."""
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
  out_axis = dot_out_axis((contract, batch), side, axes[side], ndims)
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
  ahead = window_ahead(e, "the kernel", axis, lhs_kind.ahead, (lo, hi), reach)
  if reach == 0:
    if (lo, hi) != (0, 0):
      raise e.refuse("a size-1 kernel with padding along the scanned axis")
    return pointwise(e, [axis, None], [out_axis])

  def conv(ins, padding, dilation):
    params = dict(e.params)
    params["padding"] = replaced_at(params["padding"], k, padding)
    params["rhs_dilation"] = replaced_at(params["rhs_dilation"], k, dilation)
    return P.conv_general_dilated_p.bind(*ins, **params)

  # the training mode pads with zeros
  return CausalWindow(e, axis, out_axis, reach, size, dilation, (lo, hi),
                      ahead, conv, lambda ins: 0, shared_fill=0).converted()
