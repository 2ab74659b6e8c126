"""Sharding annotations: ``sharding_constraint``
(``jax.lax.with_sharding_constraint``) and ``reshard``
(``jax.sharding.reshard``, and what ``jnp`` inserts under explicit mesh
axes). They act position by position, so they are causal; what changes in
a block is the sharding of the scanned axis."""
from jax.extend.core import primitives as P
from jax.sharding import NamedSharding, PartitionSpec

from scanagram._jax_internals import reshard_p
from scanagram.interpreter import ELEMENTWISE_PRIMITIVES, register
from scanagram.rules.common import pointwise
from scanagram.rules.elementwise import scanned_axis

ELEMENTWISE_PRIMITIVES.update([P.sharding_constraint_p, reshard_p])


def _annotation_rule(key):
  def rule(e):
    """Position by position: causal. In a block shorter than L the scanned
    axis is left unsharded (see :func:`without_axis`)."""
    axis = scanned_axis(e)
    ndim = e.in_avals[0].ndim
    full = e.in_avals[0].shape[axis]

    def resize(params, n):
      if n == full:   # a prefill of all L: the annotation as traced
        return params
      return dict(params, **{key: without_axis(params[key], axis, ndim)})
    return pointwise(e, [axis], [axis], resize)
  return rule


sharding_constraint_rule = register(P.sharding_constraint_p)(
    _annotation_rule("sharding"))
reshard_rule = register(reshard_p)(_annotation_rule("dst_sharding"))


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
