"""Prefill and step functions for Haiku models.

:func:`to_step` takes a model as Haiku users have it, ``hk.transform(forward)``
or ``hk.transform_with_state(forward)``, written for training on whole
sequences, and derives from it (through :func:`scanagram.to_step`) a
:class:`StepPair`: ``init``, ``prefill``, ``step``, a compiled ``generate``
loop, and ``bind`` for a stateful :class:`Stepper`. Parameters and Haiku state
are inputs of the compiled functions, never constants baked into them, so one
compilation serves every parameter value of the same shapes.

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp
  >>> from adapters.haiku import to_step
  >>> def forward(xs):                                  # xs: [B, T, D]
  ...   return jnp.cumsum(hk.Linear(2, with_bias=False)(xs), axis=1)
  >>> model = hk.transform(forward)
  >>> xs = jnp.ones((1, 6, 2))
  >>> params = {"linear": {"w": jnp.eye(2)}}
  >>> pair = to_step(model, xs, axis=1)
  >>> carry, out = pair.prefill(params, xs[:, :2])      # out: [1, 2, 2]
  >>> carry, y = pair.step(params, carry, xs[:, 2])     # y: [1, 2]
  >>> y.tolist()
  [[3.0, 3.0]]
"""
import collections
import inspect
import os
from typing import Any, Callable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram
from scanagram import ScanConversionError, errors

__all__ = ["to_step", "StepPair", "Stepper"]


# -- the adapter ---------------------------------------------------------------
def to_step(model, example_xs, axis: int = 0, *, params=None,
            state=None) -> "StepPair":
  """Derives a :class:`StepPair` from a Haiku model causal along ``axis``.

  Args:
    model: an ``hk.Transformed`` (``hk.transform``) or
      ``hk.TransformedWithState`` (``hk.transform_with_state``), with or
      without ``hk.without_apply_rng``, whose function takes ``xs`` and whose
      output ``[..., :t, ...]`` along ``axis`` depends only on the first t
      elements of ``xs``. A plain JAX function ``fun(params, xs)`` (or
      ``fun(params, state, xs)`` when ``state`` is given) is accepted too,
      with ``params`` required.
    example_xs: arrays or ``jax.ShapeDtypeStruct`` (a pytree) fixing the
      structure, shapes and dtypes of the input and its maximum length L along
      ``axis``.
    axis: the time axis of ``xs``, of prompts and of the outputs (1 for
      batch-major ``[B, T, ...]`` models).
    params, state: examples (arrays or ShapeDtypeStructs) of the parameters
      and state. By default they come from ``model.init`` run abstractly on
      ``example_xs``; pass them when ``init`` needs other arguments (e.g.
      ``is_training=True`` to create BatchNorm's moving averages).

  Returns:
    A :class:`StepPair`. For ``transform_with_state`` models its functions
    take the state after the parameters; the state is read, not updated.

  Raises:
    ScanConversionError: the model is not causal along ``axis`` (the message
      names the operation, its source line and the Haiku module), or it asks
      for a random key at apply time (e.g. dropout without an inference flag).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp
    >>> model = hk.transform(lambda ids: hk.Embed(5, 3)(ids))
    >>> ids = jnp.zeros((2, 8), jnp.int32)                # [B, T]
    >>> pair = to_step(model, ids, axis=1)
    >>> params = model.init(jax.random.key(0), ids)
    >>> pair.step(params, pair.init(params), ids[:, 0])[1].shape
    (2, 3)
  """
  if isinstance(model, (hk.Transformed, hk.TransformedWithState)):
    has_state = isinstance(model, hk.TransformedWithState)
    if params is None or (has_state and state is None):
      init_params, init_state = _init_shapes(model, example_xs, has_state)
      params = init_params if params is None else params
      state = init_state if state is None else state
    fun = _apply_function(model, has_state)
    unscanned = (params, state) if has_state else (params,)
    return StepPair(fun, unscanned, example_xs, axis, has_state=has_state)
  if callable(model):
    if params is None:
      raise TypeError("to_step of a plain function fun(params, xs) needs "
                      "params= (an example of the parameters)")
    unscanned = (params,) if state is None else (params, state)
    return StepPair(model, unscanned, example_xs, axis,
                    has_state=state is not None)
  raise TypeError(f"to_step expects an hk.Transformed or "
                  f"hk.TransformedWithState; got {type(model).__name__}")


def _init_shapes(model, example_xs, has_state):
  """The params (and state) shapes from ``model.init``, run abstractly."""
  try:
    out = jax.eval_shape(model.init, jax.random.key(0), example_xs)
  except Exception as e:
    raise TypeError(
        f"could not infer the parameter shapes by calling model.init(rng, xs) "
        f"({type(e).__name__}: {e}); pass them as to_step(..., params=..."
        f"{', state=...' if has_state else ''})") from e
  return out if has_state else (out, None)


def _apply_function(model, has_state):
  """``fun(params[, state], xs)``: the model's outputs, no rng, state read."""
  takes_rng = _apply_takes_rng(model.apply, has_state)

  def fun(*args):
    *unscanned, xs = args
    rng = (None,) if takes_rng else ()
    try:
      out = model.apply(*unscanned, *rng, xs)
    except ValueError as e:
      if type(e).__name__ != "MissingRNGError":
        raise
      raise _needs_rng_error(e) from e
    return out[0] if has_state else out
  return fun


def _apply_takes_rng(apply, has_state):
  try:
    names = list(inspect.signature(apply).parameters)
  except (TypeError, ValueError):
    return True
  position = 2 if has_state else 1
  return len(names) <= position or names[position] == "rng"


def _needs_rng_error(error):
  """A ScanConversionError naming the Haiku module that asked for a key."""
  module, where = None, None
  tb = error.__traceback__
  while tb is not None:
    frame = tb.tb_frame
    owner = frame.f_locals.get("self")
    if isinstance(owner, hk.Module):
      module = owner.module_name
    if not errors.is_library_file(frame.f_code.co_filename):
      where = f"{frame.f_code.co_filename}:{tb.tb_lineno}"
    tb = tb.tb_next
  who = f"Haiku module '{module}'" if module else "the model"
  at = f" (at {where})" if where else ""
  return ScanConversionError(
      f"{who} asks for a random key at apply time{at} (hk.next_rng_key, "
      "e.g. dropout); the derived step runs without one: make the inference "
      "path deterministic (e.g. an is_training=False flag that skips dropout)")


errors.register_library_path(os.path.dirname(os.path.abspath(__file__))
                             + os.sep)


# -- StepPair ------------------------------------------------------------------
class StepPair:
  """Prefill and step functions of a causal function ``fun(*unscanned, xs)``.

  Built by :func:`to_step` for Haiku models; the constructor serves any JAX
  function whose leading arguments (parameters, state) are not scanned. All
  functions take those unscanned arguments first: one compiled ``init``,
  ``prefill`` and ``step`` serve every value of the same shapes.

  Args:
    fun: ``fun(*unscanned, xs) -> ys``, causal along ``axis``.
    unscanned: a tuple of examples (arrays or ShapeDtypeStructs) of the
      leading arguments, e.g. ``(params,)`` or ``(params, state)``.
    example_xs: example of ``xs``; fixes L, the most positions served.
    axis: the time axis of ``xs``, prompts and outputs.
    has_state: whether the unscanned arguments are ``(params, state)``
      (default: when there are two).

  Attributes:
    axis, length (L), has_state, num_unscanned.
    xs_spec: ShapeDtypeStructs of ``example_xs``; element_spec: the same
      without ``axis`` (one element ``x``).
    functions: the underlying :class:`scanagram.StepFunctions`.
    trace_counts: how many times each compiled function was traced.

  Example:
    >>> import jax.numpy as jnp
    >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs @ w, axis=0),
    ...                 (jnp.ones((2, 2)),), jnp.ones((8, 2)))
    >>> carry, out = pair.prefill(jnp.eye(2), jnp.ones((3, 2)))
    >>> pair.step(jnp.eye(2), carry, jnp.ones(2))[1].tolist()
    [4.0, 4.0]
  """

  def __init__(self, fun: Callable, unscanned: Sequence[Any], example_xs,
               axis: int = 0, *, has_state: Optional[bool] = None):
    unscanned = tuple(unscanned)
    self.num_unscanned = len(unscanned)
    self.has_state = (self.num_unscanned == 2 if has_state is None
                      else bool(has_state))
    self.axis = axis
    self.xs_spec = jax.tree.map(_spec, example_xs)
    self.element_spec = jax.tree.map(lambda s: _drop_axis(s, axis),
                                     self.xs_spec)
    self.functions = scanagram.to_step(
        fun, *unscanned, example_xs,
        in_axes=(None,) * self.num_unscanned + (axis,), out_axes=axis)
    self.length = self.functions.length
    self.trace_counts = collections.Counter()
    fns = self.functions

    def counted(name, f):
      def traced(*args, **kwargs):
        self.trace_counts[name] += 1
        return f(*args, **kwargs)
      return traced

    step = counted("step", lambda u, carry, x: fns.step(*u, carry, x))
    self._init = jax.jit(counted("init", lambda u: fns.init(*u)))
    self._prefill = jax.jit(counted(
        "prefill", lambda u, prompt: fns.prefill(*u, prompt)))
    self._step = jax.jit(step)
    self._step_donated = jax.jit(step, donate_argnums=1)
    self._generate = jax.jit(counted("generate", self._generate_loop),
                             static_argnames=("steps", "sample"))

  def __repr__(self):
    return (f"StepPair(axis={self.axis}, length={self.length}, "
            f"has_state={self.has_state}, xs_spec={self.xs_spec})")

  # -- the functional interface ----------------------------------------------
  def carry_spec(self):
    """The carry's structure, shapes and dtypes (ShapeDtypeStructs)."""
    return self.functions.carry_spec()

  def init(self, *unscanned):
    """The carry before any element.

    Args:
      *unscanned: ``params`` (and ``state`` for stateful models).
    Returns:
      The carry (a dict of arrays: caches, recurrent states, ``position``).
    """
    return self._init(self._unscanned(unscanned, "init"))

  def prefill(self, *args):
    """Runs a prompt of P elements (0 <= P <= L) at once.

    Args:
      *args: ``params`` (and ``state``), then ``prompt``: like ``xs`` with P
        elements along ``axis``.
    Returns:
      ``(carry, out)``, ``out`` being the model's outputs for the prompt
      (P elements along ``axis``).
    """
    *unscanned, prompt = self._split(args, 1, "prefill", ", prompt")
    return self._prefill(unscanned, prompt)

  def step(self, *args):
    """One element: ``step(params[, state], carry, x) -> (carry, y)``.

    ``x`` and ``y`` are one element (``axis`` removed). The inputs are left
    intact (no donation); the carry must be at a position below L.
    """
    *unscanned, carry, x = self._split(args, 2, "step", ", carry, x")
    return self._step(unscanned, carry, x)

  def bind(self, *unscanned) -> "Stepper":
    """A :class:`Stepper` holding these parameters (and state) and a carry."""
    return Stepper(self, *self._unscanned(unscanned, "bind"))

  # -- generation ------------------------------------------------------------
  def generate(self, *args, rng=None):
    """Generates ``steps`` elements in one compiled loop.

    The first element is ``sample(rng_0, the prompt's last output)``, each
    next one ``sample(rng_i, the step's output for the previous element)``.
    The carry lives inside the compiled loop (a ``lax.scan`` in ``jit``) and
    is updated in place.

    Args:
      *args: ``params`` (and ``state``), ``prompt`` (P >= 1 elements along
        ``axis``), ``steps`` (P + steps - 1 <= L), ``sample`` (``sample(rng,
        y) -> x``, with ``x`` shaped like one input element; pass the same
        function each time to reuse the compiled loop) and optionally ``rng``
        (a key or an int seed; default 0).
    Returns:
      The generated elements, ``steps`` of them stacked along ``axis``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> pair.generate(1.0, jnp.ones(2), 3, lambda k, y: y).tolist()
      [2.0, 4.0, 8.0]
    """
    n = self.num_unscanned
    if len(args) == n + 4 and rng is None:
      *args, rng = args
    if len(args) != n + 3:
      raise TypeError(f"generate takes {self._names()}, prompt, steps, "
                      f"sample[, rng]; got {len(args)} arguments")
    unscanned, (prompt, steps, sample) = list(args[:n]), args[n:]
    steps = int(steps)
    lengths = {np.shape(x)[a] for x, a in
               zip(jax.tree.leaves(prompt), self._leaf_axes(prompt))}
    if len(lengths) != 1:
      raise ValueError(f"generate: the prompt's leaves have different "
                       f"lengths along axis {self.axis}: {sorted(lengths)}")
    p = lengths.pop()
    if p < 1:
      raise ValueError("generate needs a prompt of at least 1 element: the "
                       "first sample is drawn from the prompt's last output")
    if steps < 0 or p + steps - 1 > self.length:
      raise ValueError(
          f"generate: a prompt of {p} elements and {steps} steps need "
          f"{p + max(steps - 1, 0)} positions, and 0 <= steps with P + steps "
          f"- 1 <= L={self.length}; shorten the prompt or generate fewer "
          f"steps")
    if rng is None:
      rng = 0
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(rng)
    return self._generate(unscanned, prompt, rng, steps=steps, sample=sample)

  def _generate_loop(self, unscanned, prompt, rng, steps, sample):
    if steps == 0:
      return jax.tree.map(
          lambda s: jnp.zeros(_insert_axis(s.shape, self._axis_of(s, 1), 0),
                              s.dtype), self.element_spec)
    fns = self.functions
    carry, out = fns.prefill(*unscanned, prompt)
    last = jax.tree.map(lambda y: jnp.take(y, -1, axis=self.axis), out)
    keys = jax.random.split(rng, steps)
    x0 = self._checked_sample(sample, keys[0], last)

    def body(state, key):
      carry, x = state
      carry, y = fns.step(*unscanned, carry, x)
      x = self._checked_sample(sample, key, y)
      return (carry, x), x

    _, xs = lax.scan(body, (carry, x0), keys[1:])
    return jax.tree.map(
        lambda first, rest: jnp.moveaxis(
            jnp.concatenate([first[None], rest]), 0, self._axis_of(first, 1)),
        x0, xs)

  def _checked_sample(self, sample, key, y):
    x = sample(key, y)
    want = jax.tree.map(lambda s: (s.shape, jnp.dtype(s.dtype)),
                        self.element_spec)
    got = jax.tree.map(lambda v: (_spec(v).shape, jnp.dtype(_spec(v).dtype)),
                       x)
    if got != want:
      raise TypeError(f"generate: sample(rng, y) returned {got} (shape, "
                      f"dtype), but the model's input element is {want}")
    return x

  # -- helpers ---------------------------------------------------------------
  def _names(self):
    if self.num_unscanned == 1:
      return "params"
    if self.num_unscanned == 2 and self.has_state:
      return "params, state"
    return f"{self.num_unscanned} unscanned arguments"

  def _unscanned(self, args, what):
    return self._split(args, 0, what, "")

  def _split(self, args, extra, what, names):
    """Checks the number of arguments: the unscanned ones, then ``extra``."""
    if len(args) != self.num_unscanned + extra:
      raise TypeError(f"{what} takes {self._names()}{names}; got "
                      f"{len(args)} arguments")
    return list(args)

  def _axis_of(self, spec, extra=0):
    return self.axis % (len(spec.shape) + extra)

  def _leaf_axes(self, tree):
    return [self.axis % max(np.ndim(x), 1) for x in jax.tree.leaves(tree)]


def _spec(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype")
                              else jnp.result_type(x))


def _drop_axis(spec, axis):
  shape = list(spec.shape)
  del shape[axis % len(shape)]
  return jax.ShapeDtypeStruct(tuple(shape), spec.dtype)


def _insert_axis(shape, axis, n):
  shape = list(shape)
  shape.insert(axis, n)
  return tuple(shape)


# -- Stepper -------------------------------------------------------------------
class Stepper:
  """A :class:`StepPair` bound to parameters, holding the carry.

  Each call donates the carry to the compiled step, so caches are updated in
  place, not copied. Made by :meth:`StepPair.bind`.

  Attributes:
    pair: the StepPair; carry: the current carry; position: elements seen
      since the last :meth:`reset`; length: L.

  Example:
    >>> import jax.numpy as jnp
    >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
    ...                 jnp.ones((6,)))
    >>> stepper = pair.bind(1.0)
    >>> stepper.reset(jnp.ones(2)).tolist()
    [1.0, 2.0]
    >>> stepper(jnp.ones(())).tolist()
    3.0
  """

  def __init__(self, pair: StepPair, *unscanned):
    self.pair = pair
    self.length = pair.length
    self._unscanned = list(unscanned)
    self.carry = None
    self.position = 0
    self.reset()

  def reset(self, prompt=None):
    """Starts a sequence.

    Args:
      prompt: None, or P elements (0 <= P <= L) along the pair's axis.
    Returns:
      None without a prompt; otherwise the outputs for the prompt.
    """
    if prompt is None:
      self.carry, self.position = self.pair._init(self._unscanned), 0
      return None
    self.carry, out = self.pair._prefill(self._unscanned, prompt)
    self.position = int(np.shape(jax.tree.leaves(prompt)[0])[
        self.pair._leaf_axes(prompt)[0]])
    return out

  def __call__(self, x):
    """Runs one element ``x`` (``axis`` removed) and returns its output."""
    if self.position >= self.length:
      raise ValueError(f"the stepper is full: it has seen L={self.length} "
                       "elements; call reset()")
    self.carry, y = self.pair._step_donated(self._unscanned, self.carry, x)
    self.position += 1
    return y
