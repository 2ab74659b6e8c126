"""The public entry points: ``to_step``, ``as_scan``, ``as_scan_with_prefill``.
"""
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from scanagram import rules  # noqa: F401  (registers the rules)
from scanagram.errors import ScanConversionError, refusal
from scanagram.interpreter import ConvertedJaxpr, Prefill, Step, time_block
from scanagram.kinds import UNSCANNED, Scanned
from scanagram.rules import attention
from scanagram.rules.common import DelayLine

Axes = Union[int, None, Sequence[Union[int, None]]]


class StepFunctions:
  """Prefill and step derived from a causal function (see :func:`to_step`).

  Attributes:
    length: L, the length of the example along the scanned axis: the most
      positions the step can serve.
    in_axes, out_axes: as given to :func:`to_step`.
  """

  def __init__(self, fun, example_args, in_axes, out_axes):
    self.fun = fun
    self.in_axes = _per_arg(in_axes, len(example_args))
    self.out_axes = out_axes
    self._scanned_args = [i for i, a in enumerate(self.in_axes)
                          if a is not None]
    if not self._scanned_args:
      raise ValueError("to_step needs at least one scanned argument "
                       "(in_axes is None for all of them)")
    self._first_scanned = self._scanned_args[0]
    leaves, self._in_tree = jax.tree.flatten(list(example_args))
    self._in_specs = [jax.ShapeDtypeStruct(np.shape(x), _dtype(x))
                      for x in leaves]
    self._leaf_axes = []
    for i, arg in enumerate(example_args):
      axis = self.in_axes[i]
      for x in jax.tree.leaves(arg):
        self._leaf_axes.append(None if axis is None else axis % np.ndim(x))
    lengths = {spec.shape[a] for spec, a in zip(self._in_specs,
                                                self._leaf_axes)
               if a is not None}
    if len(lengths) != 1:
      raise ValueError("the scanned inputs must share their length along the "
                       f"scanned axis; got lengths {sorted(lengths)}")
    self.length = lengths.pop()
    self._out_tree = None

    def flat_fun(*flat):
      args = jax.tree.unflatten(self._in_tree, flat)
      out = fun(*args)
      out_leaves, self._out_tree = jax.tree.flatten(out)
      return out_leaves
    closed = jax.make_jaxpr(flat_fun)(*self._in_specs)
    in_kinds = [UNSCANNED if a is None else Scanned(a)
                for a in self._leaf_axes]
    self._converted = attention.convert_with_windows(
        lambda context: ConvertedJaxpr(closed.jaxpr, closed.consts, in_kinds,
                                       context=context))
    self._jaxpr = closed.jaxpr
    self._outputs = [self._output_rule(i, k, v) for i, (k, v) in
                     enumerate(zip(self._converted.out_kinds,
                                   closed.jaxpr.outvars))]
    self._prefill_jit = jax.jit(self._prefill)
    self._step_jit = jax.jit(self._step)
    self._carry_spec = None

  # -- outputs ---------------------------------------------------------------
  def _output_rule(self, i, kind, var):
    aval = var.aval
    out_axis = self.out_axes % max(len(aval.shape), 1)
    if kind is UNSCANNED:
      if len(aval.shape) == 0 or aval.shape[out_axis] != self.length:
        raise self._refuse_output(
            var, f"output {i} does not depend on the scanned input and has no "
            f"axis {self.out_axes} of length {self.length} to scan over "
            f"(shape {aval.shape})")
      return (out_axis, None)
    if attention.is_exact_history(kind):
      # attention weights as an output: each row equals the training mode's
      # at every key, the future ones included
      kind = Scanned(kind.axis, kind.ahead)
    if not isinstance(kind, Scanned):
      why = f"output {i} depends on the whole sequence"
      origin = _find_eqn(self._jaxpr, getattr(kind, "origin", None))
      if origin is not None:  # attention scores with no causal mask
        raise refusal(origin, "it pairs every position of one sequence with "
                      "every position of another (an outer product over "
                      f"time) and no causal mask follows it; {why}")
      raise self._refuse_output(var, f"{why} ({kind})")
    if kind.axis != out_axis:
      raise self._refuse_output(
          var,
          f"output {i} (shape {aval.shape}) runs along its axis {kind.axis}, "
          f"not along out_axes={self.out_axes}: its elements along axis "
          f"{out_axis} are not positions of the sequence (for as_scan the "
          f"outputs' time axis must be 0; to_step takes out_axes="
          f"{kind.axis})")
    line = None
    if kind.ahead:
      line = DelayLine(kind.axis, aval.shape[kind.axis], 0, kind.ahead)
    return (kind.axis, line)

  def _refuse_output(self, var, why):
    """A refusal naming the equation that made output ``var`` (and its
    source line), or a plain one when ``fun`` returns an input or a
    constant."""
    made_by = next((e for e in self._jaxpr.eqns
                    if any(o is var for o in e.outvars)), None)
    if made_by is None:
      return ScanConversionError(why)
    return refusal(made_by, why)

  # -- the three functions ---------------------------------------------------
  def init(self, *unscanned_args):
    """The carry before any element: ``init(*unscanned_args) -> carry``."""
    args = self._with_empty_prompt(unscanned_args)
    return self._prefill_jit(*args)[0]

  def prefill(self, *args):
    """Runs the first P elements at once (0 <= P <= L).

    Args:
      *args: ``fun``'s arguments, the scanned ones of length P along their
        axis.
    Returns:
      ``(carry, out_prefill)``, ``out_prefill`` being ``fun(xs)[:P]``.
    """
    self._check_args(args)
    return self._prefill_jit(*args)

  def step(self, *args):
    """``step(*unscanned_args, carry, *elements) -> (carry, y)``: the carry
    goes just before the first scanned argument; each scanned argument is one
    element (its scanned axis removed), and so is ``y``."""
    k = self._first_scanned
    if len(args) != len(self.in_axes) + 1:
      raise TypeError(f"step takes {len(self.in_axes) + 1} arguments (the "
                      f"carry before argument {k}); got {len(args)}")
    carry, args = args[k], args[:k] + args[k + 1:]
    self._check_carry(carry, args)
    self._check_args(args, element=True)
    return self._step_jit(carry, *args)

  # -- implementation --------------------------------------------------------
  def _prefill(self, *args):
    leaves = jax.tree.leaves(list(args))
    lengths = {np.shape(x)[a] for x, a in zip(leaves, self._leaf_axes)
               if a is not None}
    ctx = Prefill(lengths.pop())
    state, outs = self._converted.prefill(ctx, leaves)
    out_queues, ys = {}, []
    for i, (y, (axis, line)) in enumerate(zip(outs, self._outputs)):
      if line is not None:
        out_queues[i], y = line.prefill(ctx, y)
      elif self._converted.out_kinds[i] is UNSCANNED:
        y = time_block(ctx, y, axis)
      ys.append(y)
    if out_queues:
      state["outputs"] = out_queues
    carry = dict(state, position=jnp.asarray(ctx.length, jnp.int32))
    return carry, jax.tree.unflatten(self._out_tree, ys)

  def _step(self, carry, *args):
    leaves = [x if a is None else jnp.expand_dims(x, a) for x, a in
              zip(jax.tree.leaves(list(args)), self._leaf_axes)]
    carry = dict(carry)
    position = carry.pop("position")
    out_queues = carry.pop("outputs", {})
    ctx = Step(position)
    state, outs = self._converted.step(ctx, carry, leaves)
    new_queues, ys = {}, []
    for i, (y, (axis, line)) in enumerate(zip(outs, self._outputs)):
      if line is not None:
        new_queues[i], y = line.step(out_queues[i], y)
      elif self._converted.out_kinds[i] is UNSCANNED:
        y = time_block(ctx, y, axis)
      ys.append(jnp.squeeze(y, axis))
    if new_queues:
      state["outputs"] = new_queues
    new_carry = dict(state, position=position + 1)
    return new_carry, jax.tree.unflatten(self._out_tree, ys)

  def _with_empty_prompt(self, unscanned_args):
    n = len(self.in_axes) - len(self._scanned_args)
    if len(unscanned_args) != n:
      raise TypeError(f"init takes the {n} unscanned arguments; got "
                      f"{len(unscanned_args)}")
    examples = jax.tree.unflatten(self._in_tree, self._in_specs)
    it = iter(unscanned_args)
    args = []
    for i, axis in enumerate(self.in_axes):
      if axis is None:
        args.append(next(it))
      else:
        args.append(jax.tree.map(
            lambda s, a=axis: jnp.zeros(
                _with_len(s.shape, a % len(s.shape), 0), s.dtype),
            examples[i]))
    return args

  def _check_args(self, args, element=False):
    if len(args) != len(self.in_axes):
      raise TypeError(f"expected {len(self.in_axes)} arguments, got "
                      f"{len(args)}")
    leaves, tree = jax.tree.flatten(list(args))
    if tree != self._in_tree:
      raise TypeError(f"arguments have structure {tree}; expected "
                      f"{self._in_tree}")
    for path_leaf, spec, axis in zip(
        jax.tree_util.tree_flatten_with_path(list(args))[0], self._in_specs,
        self._leaf_axes):
      path, x = path_leaf
      name = "argument" + jax.tree_util.keystr(path)
      shape = tuple(np.shape(x))
      want = spec.shape
      if axis is not None:
        if element:
          want = want[:axis] + want[axis + 1:]
        elif len(shape) == len(want) and shape[axis] > self.length:
          raise ValueError(f"{name}: the prompt has {shape[axis]} elements "
                           f"along axis {axis}, more than L={self.length}")
        else:
          want = _with_len(want, axis, shape[axis] if len(shape) == len(
              want) else -1)
      if shape != tuple(want):
        raise ValueError(f"{name}: expected shape {tuple(want)}, got {shape}")
      if jnp.dtype(_dtype(x)) != jnp.dtype(spec.dtype):
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got "
                        f"{_dtype(x)}")

  def carry_spec(self):
    """The carry's structure, shapes and dtypes (ShapeDtypeStructs)."""
    if self._carry_spec is None:
      examples = jax.tree.unflatten(self._in_tree, self._in_specs)
      unscanned = [a for a, ax in zip(examples, self.in_axes) if ax is None]
      self._carry_spec = jax.eval_shape(self.init, *unscanned)
    return self._carry_spec

  def _check_carry(self, carry, args):
    spec = self.carry_spec()
    got, want = jax.tree.structure(carry), jax.tree.structure(spec)
    if got != want:
      raise TypeError(f"the carry has structure {got}; expected {want}")
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(carry)[0],
                            jax.tree.leaves(spec)):
      name = "carry" + jax.tree_util.keystr(path)
      if tuple(np.shape(x)) != s.shape:
        raise ValueError(f"{name}: expected shape {s.shape}, got "
                         f"{tuple(np.shape(x))}")
      if jnp.dtype(_dtype(x)) != s.dtype:
        raise TypeError(f"{name}: expected dtype {s.dtype}, got {_dtype(x)}")


def _find_eqn(jaxpr, eqn_id):
  """The equation with ``id(eqn) == eqn_id`` in ``jaxpr`` or its sub-jaxprs,
  or None."""
  if eqn_id is None:
    return None
  for eqn in jaxpr.eqns:
    if id(eqn) == eqn_id:
      return eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jex_core.Jaxpr):
          found = _find_eqn(sub, eqn_id)
          if found is not None:
            return found
  return None


def _with_len(shape, axis, n):
  shape = list(shape)
  shape[axis] = n
  return tuple(shape)


def _dtype(x):
  return x.dtype if hasattr(x, "dtype") else jnp.result_type(x)


def _per_arg(axes, n):
  if isinstance(axes, (list, tuple)):
    if len(axes) != n:
      raise ValueError(f"in_axes has {len(axes)} entries for {n} arguments")
    return tuple(axes)
  return (axes,) * n


def to_step(fun: Callable, *example_args, in_axes: Axes = 0,
            out_axes: int = 0) -> StepFunctions:
  """Derives prefill and step functions from a causal function.

  Args:
    fun: a function causal along the scanned axis of its scanned arguments:
      ``fun(*args)[:t]`` depends only on the first t elements.
    *example_args: arrays or ``jax.ShapeDtypeStruct`` pytrees fixing the
      structure, shapes, dtypes and the maximum length L.
    in_axes: like ``jax.vmap``'s: for each argument, the axis it is scanned
      along, or None for an argument that is not scanned (parameters, model
      state). Unscanned arguments are inputs of the derived functions, so one
      compiled step serves every parameter value.
    out_axes: the axis along which ``fun``'s outputs run in time (as in
      ``fun``'s own outputs; an output whose time axis is elsewhere is
      refused). A step output has it removed.

  Returns:
    A :class:`StepFunctions` with ``init(*unscanned)``, ``prefill(*args)``
    and ``step(*unscanned, carry, *elements)``.

  Raises:
    ScanConversionError: an operation in ``fun`` is not causal along the
      scanned axis (the message names it and its source line).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def model(w, xs):                       # xs: [T, D]
    ...   return jnp.cumsum(xs @ w, axis=0)
    >>> fns = to_step(model, jnp.ones((3, 3)), jnp.ones((8, 3)),
    ...               in_axes=(None, 0))
    >>> carry = fns.init(jnp.eye(3))
    >>> carry, y = fns.step(jnp.eye(3), carry, jnp.ones(3))
    >>> y.tolist()
    [1.0, 1.0, 1.0]
  """
  return StepFunctions(fun, example_args, in_axes, out_axes)


def as_scan(fun: Callable, example_xs):
  """``(step, carry_init)`` with ``lax.scan(step, carry_init, xs)[1] ==
  fun(xs)``, for a function causal along axis 0 of ``xs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> step, init = as_scan(lambda xs: jnp.cumsum(xs, 0), jnp.ones((4, 2)))
    >>> jax.lax.scan(step, init, jnp.ones((4, 2)))[1][:, 0].tolist()
    [1.0, 2.0, 3.0, 4.0]
  """
  fns = to_step(fun, example_xs)
  return fns.step, fns.init()


def as_scan_with_prefill(fun: Callable, example_xs, prefill):
  """``(step, carry, out_prefill)``: ``out_prefill == fun(xs)[:P]`` for a
  prompt ``prefill`` of length P, and stepping ``xs[P:]`` from ``carry``
  gives ``fun(xs)[P:]``."""
  fns = to_step(fun, example_xs)
  carry, out = fns.prefill(prefill)
  return fns.step, carry, out
