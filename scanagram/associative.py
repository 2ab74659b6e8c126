"""``associative_scan``: ``lax.associative_scan`` that converts to a step.

``lax.associative_scan`` computes all prefixes ``x_0 * ... * x_t`` of an
associative ``fn`` in O(log L) parallel depth, which is what linear RNNs and
state-space models (S5, LRU, Mamba-style recurrences) train with. JAX traces
it into strided slices and interleaving pads, whose per-primitive rules must
refuse; this version binds one primitive, ``associative_scan``, so that the
conversion sees the whole prefix computation and runs it as the recurrence it
is: the step combines the running prefix (its state) with the new element.

Everywhere else (eagerly, under ``jit``, ``grad`` and ``vmap``) it runs
``lax.associative_scan`` itself, with the same arguments and results.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from scanagram import _call_primitives, _jax_internals
from scanagram.interpreter import Converted, bind, register
from scanagram.kinds import Scanned
from scanagram.rules.common import CallLeaves, last_real, pointwise


def associative_scan(fn, elems, reverse: bool = False, axis: int = 0):
  """``jax.lax.associative_scan``, convertible by ``as_scan`` / ``to_step``.

  Same arguments and results as ``lax.associative_scan``: ``fn(a, b)``
  combines two pytrees shaped like ``elems`` (elementwise along ``axis``,
  associative), and the result holds the prefixes along ``axis``. ``fn`` may
  close over parameters; it must not close over values computed from the
  sequence (pass those in ``elems``).

  Converted along the scanned axis (``reverse=False``), the step's state is
  the prefix so far; along another axis, each position runs on its own.

  Example:
    >>> import jax.numpy as jnp, scanagram
    >>> def linear_rnn(xs):                  # h_t = 0.5 h_{t-1} + x_t
    ...   a = jnp.full_like(xs, 0.5)
    ...   combine = lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1])
    ...   return scanagram.associative_scan(combine, (a, xs))[1]
    >>> step, init = scanagram.as_scan(linear_rnn, jnp.ones((4, 2)))
    >>> jax.lax.scan(step, init, jnp.ones((4, 2)))[1][:, 0].tolist()
    [1.0, 1.5, 1.75, 1.875]
  """
  leaves, tree = jax.tree.flatten(elems)
  if not leaves:
    raise ValueError("associative_scan: elems has no arrays")
  shapes = [jnp.shape(x) for x in leaves]
  ndim = len(shapes[0])
  if not -ndim <= axis < ndim:
    raise ValueError(f"associative_scan: axis {axis} is out of range for "
                     f"elems of {ndim} dimensions")
  axis %= ndim
  lengths = {s[axis] if len(s) > axis else None for s in shapes}
  if len(lengths) != 1:
    raise ValueError("associative_scan: the leaves of elems have different "
                     f"lengths along axis {axis}: {shapes}")
  elements = [jax.ShapeDtypeStruct(s[:axis] + s[axis + 1:], jnp.result_type(x))
              for s, x in zip(shapes, leaves)]

  def flat_fn(a, b):
    out = fn(jax.tree.unflatten(tree, a), jax.tree.unflatten(tree, b))
    out_leaves, out_tree = jax.tree.flatten(out)
    if out_tree != tree:
      raise ValueError(f"associative_scan: fn returns the structure {out_tree}"
                       f", elems have {tree}")
    return out_leaves
  closed = jax.make_jaxpr(flat_fn)(elements, elements)
  for spec, got in zip(elements, closed.out_avals):
    if (tuple(spec.shape), spec.dtype) != (tuple(got.shape), got.dtype):
      raise ValueError(
          "associative_scan: fn must return elements shaped like its "
          f"arguments: {spec.shape} {spec.dtype} in, {got.shape} {got.dtype} "
          "out")
  # the values fn closes over (possibly tracers: parameters) become operands
  consts = closed.consts
  combine = jex_core.ClosedJaxpr(
      _jax_internals.convert_constvars_jaxpr(closed.jaxpr), ())
  outs = associative_scan_p.bind(*consts, *leaves, combine=combine, axis=axis,
                                 reverse=bool(reverse),
                                 n_consts=len(consts))
  return jax.tree.unflatten(tree, outs)


_jax_internals.exclude_from_user_frames(__file__)  # errors name the caller
associative_scan_p = jex_core.Primitive("associative_scan")


def _combine_fn(combine, consts, axis):
  """``fn`` on pytrees (lists of leaves) of any length along ``axis``: the
  traced element-wise combination, vectorized along it."""
  per_element = jex_core.jaxpr_as_fun(combine)

  def fn(a, b):
    return jax.vmap(lambda *ab: per_element(*consts, *ab), in_axes=axis,
                    out_axes=axis)(*a, *b)
  return fn


def _run(*args, combine, axis, reverse, n_consts):
  consts, leaves = args[:n_consts], list(args[n_consts:])
  return lax.associative_scan(_combine_fn(combine, consts, axis), leaves,
                              reverse=reverse, axis=axis)


def _abstract_eval(*avals, combine, axis, n_consts, **_):
  return avals[n_consts:]


def _batch(args, dims, *, combine, axis, reverse, n_consts):
  """vmap keeps the primitive (a vmapped model still converts): the batch
  axis goes first on every operand, and ``fn`` is vmapped over it."""
  consts, const_axes, leaves = _call_primitives.batch_first(args, dims,
                                                           n_consts)
  elements = [jax.ShapeDtypeStruct(x.shape[:axis + 1] + x.shape[axis + 2:],
                                   x.dtype) for x in leaves]
  inner, combine = _call_primitives.vmapped(combine, const_axes, consts,
                                            elements + elements)
  outs = associative_scan_p.bind(*inner, *consts, *leaves, combine=combine,
                                 axis=axis + 1, reverse=reverse,
                                 n_consts=len(inner) + n_consts)
  return outs, [0] * len(outs)


_call_primitives.define(associative_scan_p, _run, _abstract_eval, _batch)


@register(associative_scan_p)
def associative_scan_rule(e):
  """Along the scanned axis: causal when not reversed (prefix t combines
  elements 0..t); the state is the prefix so far. Along another axis:
  pointwise in time. Refused when ``fn`` closes over a value that depends on
  the scanned input."""
  n_consts, axis = e.params["n_consts"], e.params["axis"]
  leaves = CallLeaves(e, n_consts, "associative_scan's fn",
                         "pass that value in elems instead")
  time, n_out = leaves.axis, len(e.out_avals)
  if time != axis:
    return pointwise(e, [None] * n_consts + [time] * len(leaves.kinds),
                     [time] * n_out)
  if e.params["reverse"]:
    raise e.refuse(f"it runs with reverse=True along the scanned axis {axis}: "
                   "element t combines elements t..L-1, the future")
  return _prefix_recurrence(e, leaves)


def _prefix_recurrence(e, leaves):
  """The scan along time as a recurrence: the state is the prefix of the
  elements so far (size 1 along the axis). The first element has none and
  is its own prefix (``fn`` need have no identity).

  The prefix keeps only the leaves that the used outputs need (a linear
  recurrence's ``h``, not the product of its decays when that is dropped),
  as a hand-written step would.
  """
  axis, n_consts = leaves.axis, e.params["n_consts"]
  kept = _needed_leaves(e.params["combine"].jaxpr, n_consts, e.outputs_read)

  def advance(ctx, prefix, ins):
    consts, xs = leaves.split(ctx, ins)
    if ctx.fresh:
      ys = bind(e.eqn, consts + xs)
      before = [jnp.zeros(_size_one(ys[i].shape, axis), ys[i].dtype)
                for i in kept]
    else:   # the running prefix combined with the block's own prefixes
      before = prefix
      own = bind(e.eqn, consts + xs) if ctx.size > 1 else xs
      full = [jnp.zeros_like(x) for x in own]   # leaves no used output reads
      for i, p in zip(kept, prefix):
        full[i] = jnp.broadcast_to(p, own[i].shape)
      combined = _combine_fn(e.params["combine"], consts, axis)(full, own)
      started = ctx.start + leaves.ahead > 0   # element 0 has no prefix
      ys = [jnp.where(started, c, x) for c, x in zip(combined, own)]
    prefix = [last_real(ctx, ys[i], axis, leaves.ahead, b)
              for i, b in zip(kept, before)]
    return prefix, ys

  out_kinds = [Scanned(axis, leaves.ahead)] * len(e.out_avals)
  return Converted(out_kinds, advance, True)


def _needed_leaves(combine, n_consts, outputs_read):
  """The prefix leaves the outputs read later depend on, through any number
  of steps: those outputs, and every left leaf that a needed output of
  ``combine`` reads."""
  n = len(outputs_read)
  left = combine.invars[n_consts:n_consts + n]
  reads = {v: {i} for i, v in enumerate(left)}
  for eqn in combine.eqns:
    read = set().union(*(reads.get(v, set()) for v in eqn.invars
                         if not isinstance(v, jex_core.Literal)))
    for v in eqn.outvars:
      reads[v] = read
  out_reads = [set() if isinstance(v, jex_core.Literal) else reads.get(v, set())
               for v in combine.outvars]
  needed = {i for i, read in enumerate(outputs_read) if read}
  while True:
    more = set().union(needed, *(out_reads[i] for i in needed))
    if more == needed:
      return sorted(needed)
    needed = more


def _size_one(shape, axis):
  return tuple(1 if i == axis else s for i, s in enumerate(shape))


__all__ = ["associative_scan", "associative_scan_p"]
