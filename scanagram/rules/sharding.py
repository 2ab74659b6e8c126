"""Sharding annotations: ``sharding_constraint``
(``jax.lax.with_sharding_constraint``). It acts position by position, so it
is causal; what changes in a block is the sharding of the scanned axis."""
from jax.extend.core import primitives as P
from jax.sharding import NamedSharding, PartitionSpec

from scanagram.interpreter import ELEMENTWISE_PRIMITIVES, register
from scanagram.rules.common import pointwise
from scanagram.rules.elementwise import scanned_axis

ELEMENTWISE_PRIMITIVES.add(P.sharding_constraint_p)


@register(P.sharding_constraint_p)
def sharding_constraint_rule(e):
  """Position by position: causal. In a block shorter than L the scanned
  axis is left unsharded (see :func:`without_axis`)."""
  axis = scanned_axis(e)
  ndim = e.in_avals[0].ndim
  full = e.in_avals[0].shape[axis]

  def resize(params, n):
    if n == full:   # a prefill of all L: the constraint as traced
      return params
    return dict(params, sharding=without_axis(params["sharding"], axis, ndim))
  return pointwise(e, [axis], [axis], resize)


def without_axis(sharding, axis: int, ndim: int):
  """``sharding`` with the scanned ``axis`` left unsharded: a block of k
  elements need not divide over the mesh axes the full length did, and a
  step of one element split over them would gather every step."""
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
  if spec[axis] is None:
    return sharding
  spec[axis] = None
  return sharding.update(spec=PartitionSpec(*spec))
