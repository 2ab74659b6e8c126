"""What the call-like primitives (``custom_scanagram``, ``associative_scan``)
share: a JVP that differentiates what the primitive runs, and vmap rules
that keep the primitive in the jaxpr, so that a model whose layers are
vmapped over the batch still converts (every operand gets its batch axis
first, and the primitive's function is vmapped over it)."""
import functools

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from scanagram import _jax_internals
from scanagram._jax_internals import ad, batching, mlir


def define(primitive, run, abstract_eval, batch):
  """Gives a call-like ``primitive`` its implementation and lowering
  (``run(*operands, **params)``, what it computes), its abstract
  evaluation, its vmap rule ``batch`` and a JVP: the primal outputs bound as
  the primitive (so that they still convert), the tangents those of
  ``run``."""
  def jvp(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    outs = primitive.bind(*primals, **params)
    _, out_tangents = jax.jvp(functools.partial(run, **params),
                              tuple(primals), tuple(tangents))
    return outs, list(out_tangents)

  primitive.multiple_results = True
  primitive.def_impl(run)
  primitive.def_abstract_eval(abstract_eval)
  ad.primitive_jvps[primitive] = jvp
  batching.primitive_batchers[primitive] = batch
  mlir.register_lowering(primitive,
                         mlir.lower_fun(run, multiple_results=True))


def batch_first(args, dims, n_consts):
  """``(consts, const_axes, leaves)``: the operands with the batch axis
  first. Unbatched consts stay as they are (their axis is None); unbatched
  leaves are broadcast, so that every leaf has the batch axis."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  consts, leaves = [], []
  for i, (a, d) in enumerate(zip(args, dims)):
    if i < n_consts:
      consts.append(a if d is None else jnp.moveaxis(a, d, 0))
    elif d is None:
      leaves.append(jnp.broadcast_to(a, (size,) + a.shape))
    else:
      leaves.append(jnp.moveaxis(a, d, 0))
  return consts, [None if d is None else 0 for d in dims[:n_consts]], leaves


def vmapped(closed_jaxpr, const_axes, consts, leaf_specs):
  """``(new consts, ClosedJaxpr)``: ``closed_jaxpr`` (consts first, then
  leaves) vmapped over axis 0 of the leaves and of the batched consts; the
  values it closes over become leading operands, before ``consts``."""
  fun = jex_core.jaxpr_as_fun(closed_jaxpr)
  batched = jax.vmap(fun, in_axes=list(const_axes) + [0] * len(leaf_specs))
  closed = jax.make_jaxpr(batched)(
      *[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in consts], *leaf_specs)
  return list(closed.consts), jex_core.ClosedJaxpr(
      _jax_internals.convert_constvars_jaxpr(closed.jaxpr), ())
