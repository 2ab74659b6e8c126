"""``custom_scanagram``: a user-given step for a function that is causal as a
whole though built from parts that are not (attention written with a mask, a
blockwise algorithm, a call into a kernel).

The decorated function runs as its body everywhere (eagerly, under ``jit``,
``grad`` and ``vmap``); only the conversion to prefill and step uses the rule.
Under ``vmap`` the primitive stays, so that a vmapped per-example layer still
converts: the rule is asked about one example and its functions are vmapped.
It binds one primitive, ``custom_scanagram``, whose operands are the values
the body closes over followed by the leaves of ``xs``.
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from scanagram import _call_primitives, _jax_internals
from scanagram.interpreter import Converted, register
from scanagram.kinds import Scanned
from scanagram.rules.common import CallLeaves


class custom_scanagram:  # noqa: N801  (a decorator, named like jax.custom_jvp)
  """Makes ``fun(xs)`` convertible with a rule that gives its step.

  Define the rule with one of:

  * ``@f.def_scanagram``: ``rule(axis, xs_shapes) -> (out_axis, body_fn,
    carry_init)``; ``body_fn(carry, x) -> (carry, y)`` takes one element of
    ``xs`` (its ``axis`` removed) and gives one element of the output (its
    ``out_axis`` removed). A prompt is run by scanning ``body_fn`` over it
    from ``carry_init``.
  * ``@f.def_scanagram_with_prefill``: ``rule(axis, xs_shapes) -> (out_axis,
    init_fn, body_fn)``; ``init_fn(prefill) -> (carry, out_prefill)`` runs a
    prompt of length P (0 <= P <= L) along ``axis`` at once.

  ``axis`` is the axis ``xs`` is scanned along (the same for all its leaves),
  ``xs_shapes`` a pytree of ``jax.ShapeDtypeStruct`` with the full length L.
  The rule's functions must compute from their arguments and from concrete
  values: they run when the step is traced, so they must not close over
  values traced inside ``fun`` (parameters of ``to_step``: pass those in
  ``xs``).

  Example:
    >>> import jax, jax.numpy as jnp, scanagram
    >>> @scanagram.custom_scanagram
    ... def running_mean(xs):                     # xs: [T, D]
    ...   mask = jnp.tril(jnp.ones((len(xs), len(xs))))
    ...   return (mask / mask.sum(1, keepdims=True)) @ xs
    >>> @running_mean.def_scanagram
    ... def _(axis, xs_shapes):
    ...   def body(carry, x):
    ...     total, n = carry
    ...     return (total + x, n + 1), (total + x) / (n + 1)
    ...   return axis, body, (jnp.zeros(xs_shapes.shape[1:]), 0.)
    >>> step, init = scanagram.as_scan(running_mean, jnp.ones((4, 2)))
    >>> xs = jnp.arange(8.).reshape(4, 2)
    >>> jax.lax.scan(step, init, xs)[1][:, 0].tolist()
    [0.0, 1.0, 2.0, 3.0]
  """

  def __init__(self, fun: Callable):
    functools.update_wrapper(self, fun)
    self.fun = fun
    self.rule = None
    self.with_prefill = False

  def def_scanagram(self, rule: Callable) -> Callable:
    """Sets ``rule(axis, xs_shapes) -> (out_axis, body_fn, carry_init)``."""
    self.rule, self.with_prefill = rule, False
    return rule

  def def_scanagram_with_prefill(self, rule: Callable) -> Callable:
    """Sets ``rule(axis, xs_shapes) -> (out_axis, init_fn, body_fn)``."""
    self.rule, self.with_prefill = rule, True
    return rule

  def __call__(self, xs):
    leaves, in_tree = jax.tree.flatten(xs)
    out_tree = []

    def flat_fun(*flat):
      out = self.fun(jax.tree.unflatten(in_tree, flat))
      out_leaves, tree = jax.tree.flatten(out)
      out_tree.append(tree)
      return out_leaves
    specs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
             for x in leaves]
    closed = jax.make_jaxpr(flat_fun)(*specs)
    # the values the body closes over (possibly tracers) become operands
    consts = closed.consts
    body = jex_core.ClosedJaxpr(
        _jax_internals.convert_constvars_jaxpr(closed.jaxpr), ())
    outs = custom_scanagram_p.bind(*consts, *leaves, body=body, custom=self,
                                   n_consts=len(consts), in_tree=in_tree)
    return jax.tree.unflatten(out_tree[0], outs)


_jax_internals.exclude_from_user_frames(__file__)  # errors name the caller
custom_scanagram_p = jex_core.Primitive("custom_scanagram")


def _run_body(*args, body, **_):
  return jex_core.jaxpr_as_fun(body)(*args)




def _batch(args, dims, *, body, custom, n_consts, in_tree):
  """vmap keeps the primitive (a vmapped model still converts): the batch
  axis goes first on every operand, the body is vmapped over it, and the
  rule's functions will be (:class:`_Batched`)."""
  consts, const_axes, leaves = _call_primitives.batch_first(args, dims,
                                                           n_consts)
  specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
  inner, body = _call_primitives.vmapped(body, const_axes, consts, specs)
  outs = custom_scanagram_p.bind(*inner, *consts, *leaves, body=body,
                                 custom=_Batched(custom, leaves[0].shape[0]),
                                 n_consts=len(inner) + n_consts,
                                 in_tree=in_tree)
  return outs, [0] * len(outs)


class _Batched:
  """A custom_scanagram function under vmap: its rule on the batched
  shapes (batch axis first) is the user's rule on one example, vmapped."""

  def __init__(self, custom, size):
    self.custom, self.size = custom, size
    self.__name__ = getattr(custom, "__name__", "the custom_scanagram function")
    self.with_prefill = custom.with_prefill
    self.rule = None if custom.rule is None else self._rule

  def _rule(self, axis, xs_shapes):
    one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype),
                       xs_shapes)
    out = self.custom.rule(axis - 1, one)
    out_axis = out[0] + 1 if out[0] >= 0 else out[0]
    if self.with_prefill:
      _, init_fn, body_fn = out
      return out_axis, jax.vmap(init_fn), jax.vmap(body_fn)
    _, body_fn, carry_init = out
    carry = jax.tree.map(
        lambda c: jnp.broadcast_to(c, (self.size,) + jnp.shape(c)),
        carry_init)
    return out_axis, jax.vmap(body_fn), carry


_call_primitives.define(custom_scanagram_p, _run_body,
                        lambda *_, body, **__: body.out_avals, _batch)


@register(custom_scanagram_p)
def custom_scanagram_rule(e):
  """Causal by the user's word: runs the user's rule. Refused when the body
  closes over a value that depends on the scanned input or when the leaves
  of ``xs`` are scanned along different axes."""
  n_consts, in_tree = e.params["n_consts"], e.params["in_tree"]
  custom = e.params["custom"]
  name = getattr(custom, "__name__", "the custom_scanagram function")
  if custom.rule is None:
    raise e.refuse(f"{name} has no rule: define one with @{name}.def_scanagram"
                   f" or @{name}.def_scanagram_with_prefill")
  leaves = CallLeaves(e, n_consts, name, "pass it in xs instead")
  axis, length = leaves.axis, leaves.length
  if isinstance(custom, _Batched) and axis == 0:
    raise e.refuse(f"vmap maps {name} over the scanned axis: decorate the "
                   "function that runs over the whole sequence")
  avals = e.in_avals[n_consts:]
  xs_shapes = jax.tree.unflatten(
      in_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])
  if custom.with_prefill:
    out_axis, init_fn, body_fn = custom.rule(axis, xs_shapes)
  else:
    out_axis, body_fn, carry_init = custom.rule(axis, xs_shapes)
  out_axes = [out_axis % max(a.ndim, 1) for a in e.out_avals]

  def run_steps(ctx, carry, xs):
    """The user's body over the block's elements (the carry stops after the
    real ones)."""
    moved = [jnp.moveaxis(x, axis, 0) for x in xs]
    n = moved[0].shape[0]
    real = ctx.real(length, leaves.ahead)

    def body(c, i_x):
      i, x = i_x
      new, y = body_fn(c, jax.tree.unflatten(in_tree, x))
      if not isinstance(real, int):
        new = jax.tree.map(lambda a, b: jnp.where(i < real, a, b), new, c)
      return new, y
    carry, ys = lax.scan(body, carry, (jnp.arange(n), moved), length=n)
    return carry, [jnp.moveaxis(y, 0, a)
                   for y, a in zip(jax.tree.leaves(ys), out_axes)]

  def advance(ctx, carry, ins):
    _, xs = leaves.split(ctx, ins)
    if ctx.fresh and custom.with_prefill and ctx.count is None:
      carry, out = init_fn(jax.tree.unflatten(in_tree, xs))
      return carry, _check_outs(e, name, jax.tree.leaves(out))
    if ctx.fresh and custom.with_prefill:   # the user's prefill of nothing
      empty = [lax.slice_in_dim(x, 0, 0, axis=axis) for x in xs]
      carry, _ = init_fn(jax.tree.unflatten(in_tree, empty))
    elif ctx.fresh:
      carry = jax.tree.map(jnp.asarray, carry_init)
    if ctx.is_step:
      x = jax.tree.unflatten(in_tree, [jnp.squeeze(x, axis) for x in xs])
      new, y = body_fn(carry, x)
      if ctx.count is not None:
        new = jax.tree.map(lambda a, b: jnp.where(ctx.count > 0, a, b), new,
                           carry)
      ys = [jnp.expand_dims(y, a)
            for y, a in zip(jax.tree.leaves(y), out_axes)]
      return new, _check_outs(e, name, ys)
    carry, ys = run_steps(ctx, carry, xs)
    return carry, _check_outs(e, name, ys)
  # the values the body closes over serve the body only, which the
  # conversion does not run: no block on a state needs them
  return Converted([Scanned(a, leaves.ahead) for a in out_axes], advance,
                   True, step_reads=(False,) * n_consts +
                   (True,) * (len(e.in_kinds) - n_consts))


def _check_outs(e, name, ys):
  if len(ys) != len(e.out_avals):
    raise e.refuse(f"{name}'s rule gives {len(ys)} outputs; the function "
                   f"gives {len(e.out_avals)}")
  return ys


__all__ = ["custom_scanagram", "custom_scanagram_p"]
