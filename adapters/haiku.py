"""Prefill and step functions for Haiku models.

:func:`to_step` takes a model as Haiku users have it, ``hk.transform(forward)``
or ``hk.transform_with_state(forward)``, written for training on whole
sequences, and derives from it (through :func:`scanagram.to_step`) a
:class:`StepPair`: ``init``, ``prefill``, ``extend``, ``step``, a compiled
``generate`` loop, and ``bind`` for a stateful :class:`Stepper`. Parameters
and Haiku state are inputs of the compiled functions, never constants baked
into them, so one compilation serves every parameter value of the same
shapes.

With ``batch_axis`` (the axis of independent rows of ``xs``, e.g. 0 for
``[B, T, ...]``), every row keeps its own position: ``prefill``, ``extend``,
``generate`` and the :class:`Stepper` take per-row ``lengths`` for
right-padded prompts and blocks of different lengths.

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
def to_step(model, example_xs, axis: int = 0, *,
            batch_axis: Optional[int] = None, params=None,
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
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (0 for batch-major ``[B, T, ...]`` models, 1 for time-major
      ``[T, B, ...]`` ones), as ``jax.vmap``'s ``in_axes``/``out_axes``. With
      it every row has its own position: ``prefill``, ``extend`` and
      ``generate`` take per-row ``lengths``, the carry has the rows first on
      every leaf and ``positions(carry)`` is ``[B]``. A model that mixes rows
      (batch statistics, attention across the batch) is then refused.
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
    >>> rows = to_step(model, ids, axis=1, batch_axis=0)  # ragged prompts
    >>> carry, out = rows.prefill(params, ids[:, :3], lengths=[3, 1])
    >>> rows.positions(carry).tolist()
    [3, 1]
  """
  if isinstance(model, (hk.Transformed, hk.TransformedWithState)):
    has_state = isinstance(model, hk.TransformedWithState)
    if params is None or (has_state and state is None):
      init_params, init_state = _init_shapes(model, example_xs, has_state)
      params = init_params if params is None else params
      state = init_state if state is None else state
    fun = _apply_function(model, has_state)
    unscanned = (params, state) if has_state else (params,)
    return StepPair(fun, unscanned, example_xs, axis, has_state=has_state,
                    batch_axis=batch_axis)
  if callable(model):
    if params is None:
      raise TypeError("to_step of a plain function fun(params, xs) needs "
                      "params= (an example of the parameters)")
    unscanned = (params,) if state is None else (params, state)
    return StepPair(model, unscanned, example_xs, axis,
                    has_state=state is not None, batch_axis=batch_axis)
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
  ``prefill``, ``extend`` and ``step`` serve every value of the same shapes.

  Args:
    fun: ``fun(*unscanned, xs) -> ys``, causal along ``axis``.
    unscanned: a tuple of examples (arrays or ShapeDtypeStructs) of the
      leading arguments, e.g. ``(params,)`` or ``(params, state)``.
    example_xs: example of ``xs``; fixes L, the most positions served (when
      the state needs L; see ``max_length``).
    axis: the time axis of ``xs``, prompts and outputs.
    has_state: whether the unscanned arguments are ``(params, state)``
      (default: when there are two).
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (see :func:`to_step`): then each row has its own position and
      ``prefill``, ``extend``, ``generate`` take per-row ``lengths``.

  Attributes:
    axis, batch_axis, length (L), has_state, num_unscanned.
    max_length: L when the state needs it (attention caches, position
      tables): positions >= L cannot be served. None when it does not (RNN
      carries, convolution queues): such a pair steps and generates past L.
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
    >>> print(pair.max_length)          # a running sum needs no L
    None
  """

  def __init__(self, fun: Callable, unscanned: Sequence[Any], example_xs,
               axis: int = 0, *, has_state: Optional[bool] = None,
               batch_axis: Optional[int] = None):
    unscanned = tuple(unscanned)
    self.num_unscanned = n = len(unscanned)
    self.has_state = (n == 2 if has_state is None else bool(has_state))
    self.axis = axis
    self.batch_axis = batch_axis
    self.xs_spec = jax.tree.map(_spec, example_xs)
    self.element_spec = jax.tree.map(lambda s: _drop_axis(s, axis),
                                     self.xs_spec)
    self.functions = scanagram.to_step(
        fun, *unscanned, example_xs,
        in_axes=(None,) * n + (axis,), out_axes=axis,
        batch_axes=None if batch_axis is None else (None,) * n + (batch_axis,),
        out_batch_axes=batch_axis)
    self.length = self.functions.length
    self.trace_counts = collections.Counter()
    fns = self.functions

    def counted(name, f):
      def traced(*args, **kwargs):
        self.trace_counts[name] += 1
        return f(*args, **kwargs)
      return traced

    step = counted("step", lambda u, carry, x: fns.step(*u, carry, x))
    extend = counted("extend", lambda u, carry, block, lengths: fns.extend(
        *u, carry, block, lengths=lengths))
    self._init = jax.jit(counted("init", lambda u, batch_size: fns.init(
        *u, batch_size=batch_size)), static_argnums=1)
    self._prefill = jax.jit(counted(
        "prefill", lambda u, prompt, lengths: fns.prefill(
            *u, prompt, lengths=lengths)))
    self._step = jax.jit(step)
    self._step_donated = jax.jit(step, donate_argnums=1)
    self._extend = jax.jit(extend)
    self._extend_donated = jax.jit(extend, donate_argnums=1)
    self._generate = jax.jit(counted("generate", self._generate_loop),
                             static_argnames=("steps", "sample"))

  def __repr__(self):
    rows = "" if self.batch_axis is None else f"batch_axis={self.batch_axis}, "
    return (f"StepPair(axis={self.axis}, {rows}length={self.length}, "
            f"has_state={self.has_state}, xs_spec={self.xs_spec})")

  # -- the functional interface ----------------------------------------------
  @property
  def max_length(self) -> Optional[int]:
    """L when the state needs it, else None (see the class docstring)."""
    return self.functions.max_length

  def carry_spec(self):
    """The carry's structure, shapes and dtypes (ShapeDtypeStructs)."""
    return self.functions.carry_spec()

  def positions(self, carry):
    """The number of elements ``carry`` has seen: an int32 scalar, or
    ``[B]`` (one per row) with ``batch_axis``."""
    return self.functions.positions(carry)

  def init(self, *unscanned, batch_size: Optional[int] = None):
    """The carry before any element.

    Args:
      *unscanned: ``params`` (and ``state`` for stateful models).
      batch_size: with ``batch_axis``, the number of rows (default: the
        example's).
    Returns:
      The carry (a dict of arrays: caches, recurrent states, ``position``).
    """
    if batch_size is not None and self.batch_axis is None:
      raise TypeError("init: batch_size needs rows: convert with "
                      "to_step(..., batch_axis=...)")
    return self._init(self._unscanned(unscanned, "init"),
                      None if batch_size is None else int(batch_size))

  def prefill(self, *args, lengths=None):
    """Runs a prompt of P elements (0 <= P <= L) at once.

    Args:
      *args: ``params`` (and ``state``), then ``prompt``: like ``xs`` with P
        elements along ``axis``.
      lengths: with ``batch_axis`` only: ``[B]`` ints in [0, P]; row b's
        prompt is its first ``lengths[b]`` elements (the rest is padding,
        whatever its values) and row b's carry is at position
        ``lengths[b]``. Default: every row takes all P.
    Returns:
      ``(carry, out)``, ``out`` being the model's outputs for the prompt
      (P elements along ``axis``; 0 at a row's padded positions).

    Raises:
      TypeError: ``lengths`` without ``batch_axis``.
    """
    *unscanned, prompt = self._split(args, 1, "prefill", ", prompt")
    lengths = self._lengths(lengths, prompt, "prefill")
    return self._prefill(unscanned, prompt, lengths)

  def extend(self, *args, lengths=None):
    """Advances a carry by a block of k >= 1 elements at once.

    ``extend(params[, state], carry, block, lengths=None) -> (carry, ys)``:
    the next turn of a conversation, chunked prefill, k drafted tokens to
    verify. ``ys`` equals the outputs of k calls of :meth:`step`. The inputs
    are left intact (no donation).

    Args:
      *args: ``params`` (and ``state``), ``carry``, then ``block``: like
        ``xs`` with k elements along ``axis``.
      lengths: with ``batch_axis`` only: ``[B]`` ints in [0, k]; row b
        advances by its first ``lengths[b]`` elements (0: it stays where it
        is); the outputs at the rest are 0.
    Returns:
      ``(carry, ys)``: ``ys`` has k elements along ``axis``.

    Raises:
      ValueError: (when ``max_length`` is not None and the carry is a
        concrete array) a row would go past position L - 1.
      TypeError: ``lengths`` without ``batch_axis``.

    Example:
      >>> import jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 1) * w, (1.0,),
      ...                 jnp.ones((2, 6)), axis=1, batch_axis=0)
      >>> carry, out = pair.prefill(1.0, jnp.ones((2, 3)), lengths=[3, 1])
      >>> out.tolist()
      [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]
      >>> carry, ys = pair.extend(1.0, carry, jnp.ones((2, 2)))
      >>> ys.tolist(), pair.positions(carry).tolist()
      ([[4.0, 5.0], [2.0, 3.0]], [5, 3])
    """
    *unscanned, carry, block = self._split(args, 2, "extend",
                                           ", carry, block")
    k = self._block_length(block)
    lengths = self._lengths(lengths, block, "extend")
    if k == 0:
      raise ValueError("extend takes blocks of at least one element along "
                       f"axis {self.axis}")
    self._check_room(_concrete_positions(carry), k, lengths, "extend")
    return self._extend(unscanned, carry, block, lengths)

  def step(self, *args):
    """One element: ``step(params[, state], carry, x) -> (carry, y)``.

    ``x`` and ``y`` are one element (``axis`` removed). The inputs are left
    intact (no donation). With ``max_length`` not None the carry must be at
    a position below L: called eagerly, a step at L raises ``ValueError``;
    under a trace (``jit``, ``scan``) its floating outputs are NaN there.
    """
    *unscanned, carry, x = self._split(args, 2, "step", ", carry, x")
    self._check_room(_concrete_positions(carry), 1, None, "step")
    return self._step(unscanned, carry, x)

  def bind(self, *unscanned) -> "Stepper":
    """A :class:`Stepper` holding these parameters (and state) and a carry."""
    return Stepper(self, *self._unscanned(unscanned, "bind"))

  # -- generation ------------------------------------------------------------
  def generate(self, *args, rng=None, lengths=None):
    """Generates ``steps`` elements in one compiled loop.

    The first element is ``sample(rng_0, the prompt's last output)``, each
    next one ``sample(rng_i, the step's output for the previous element)``.
    The carry lives inside the compiled loop (a ``lax.scan`` in ``jit``) and
    is updated in place.

    Args:
      *args: ``params`` (and ``state``), ``prompt`` (P >= 1 elements along
        ``axis``), ``steps``, ``sample`` (``sample(rng, y) -> x``, with ``x``
        shaped like one input element; pass the same function each time to
        reuse the compiled loop) and optionally ``rng`` (a key or an int
        seed; default 0).
      lengths: with ``batch_axis`` only: ``[B]`` ints in [1, P]; row b's
        prompt is its first ``lengths[b]`` elements. Its first generated
        element is sampled from its output at position ``lengths[b] - 1``,
        and it goes on from there, each row from its own position.
    Returns:
      The generated elements, ``steps`` of them stacked along ``axis``.

    Raises:
      ValueError: ``P + steps - 1 > L`` (with ``lengths``,
        ``max(lengths) + steps - 1 > L``) when ``max_length`` is not None;
        a pair whose state does not need L (an RNN) generates any number.
      TypeError: ``lengths`` without ``batch_axis``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> pair.generate(1.0, jnp.ones(2), 3, lambda k, y: y).tolist()
      [2.0, 4.0, 8.0]
      >>> pair.generate(1.0, jnp.ones(2), 8, lambda k, y: y)[-1].item()  # past L
      256.0
    """
    n = self.num_unscanned
    if len(args) == n + 4 and rng is None:
      *args, rng = args
    if len(args) != n + 3:
      raise TypeError(f"generate takes {self._names()}, prompt, steps, "
                      f"sample[, rng]; got {len(args)} arguments")
    unscanned, (prompt, steps, sample) = list(args[:n]), args[n:]
    steps = int(steps)
    sizes = {np.shape(x)[a] for x, a in
             zip(jax.tree.leaves(prompt), self._leaf_axes(prompt))}
    if len(sizes) != 1:
      raise ValueError(f"generate: the prompt's leaves have different "
                       f"lengths along axis {self.axis}: {sorted(sizes)}")
    p = sizes.pop()
    if p < 1:
      raise ValueError("generate needs a prompt of at least 1 element: the "
                       "first sample is drawn from the prompt's last output")
    lengths = self._lengths(lengths, prompt, "generate", minimum=1)
    used = p
    if lengths is not None and not isinstance(lengths, jax.core.Tracer):
      used = int(np.max(np.asarray(lengths), initial=1))
    limit = self.max_length
    if steps < 0 or (limit is not None and used + steps - 1 > limit):
      longest = "a prompt" if lengths is None else "a longest prompt"
      raise ValueError(
          f"generate: {longest} of {used} elements and {steps} steps need "
          f"{used + max(steps - 1, 0)} positions, and 0 <= steps with P + "
          f"steps - 1 <= L={limit} (the state holds L positions); shorten "
          f"the prompt or generate fewer steps")
    if rng is None:
      rng = 0
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(rng)
    return self._generate(unscanned, prompt, lengths, rng, steps=steps,
                          sample=sample)

  def _generate_loop(self, unscanned, prompt, lengths, rng, steps, sample):
    if steps == 0:
      return jax.tree.map(
          lambda x: jnp.zeros(_with_size(x.shape, self._axis_of(x), 0),
                              x.dtype), prompt)
    fns = self.functions
    element = jax.tree.map(
        lambda x: (_drop(x.shape, self._axis_of(x)), jnp.dtype(x.dtype)),
        prompt)
    carry, out = fns.prefill(*unscanned, prompt, lengths=lengths)
    if lengths is None:
      last = jax.tree.map(lambda y: jnp.take(y, -1, axis=self._axis_of(y)),
                          out)
    else:
      last = jax.tree.map(lambda y: self._at_rows(y, lengths - 1), out)
    keys = jax.random.split(rng, steps)
    x0 = self._checked_sample(sample, keys[0], last, element)

    def body(state, key):
      carry, x = state
      carry, y = fns.step(*unscanned, carry, x)
      x = self._checked_sample(sample, key, y, element)
      return (carry, x), x

    _, xs = lax.scan(body, (carry, x0), keys[1:])
    return jax.tree.map(
        lambda first, rest: jnp.moveaxis(
            jnp.concatenate([first[None], rest]), 0, self._axis_of(first, 1)),
        x0, xs)

  def _at_rows(self, y, index):
    """``y``'s element at position ``index[b]`` along ``axis``, for each row
    b (``axis`` removed)."""
    a, r = self._axis_of(y), self.batch_axis % y.ndim
    moved = jnp.moveaxis(y, (a, r), (0, 1))
    picked = moved[index, jnp.arange(moved.shape[1])]
    return jnp.moveaxis(picked, 0, r - (r > a))

  def _checked_sample(self, sample, key, y, want):
    x = sample(key, y)
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

  def _block_length(self, block):
    """The number of elements of a prompt or block along ``axis``."""
    leaves = jax.tree.leaves(block)
    if not leaves:
      raise TypeError("the prompt or block has no arrays")
    shape = _shape(leaves[0])
    if not shape:
      raise ValueError(f"a prompt or block needs the time axis {self.axis}; "
                       f"got a scalar")
    return shape[self.axis % len(shape)]

  def _num_rows(self, block):
    shape = _shape(jax.tree.leaves(block)[0])
    if len(shape) < 2:
      raise ValueError(f"a prompt or block needs the time axis {self.axis} "
                       f"and the batch axis {self.batch_axis}; got shape "
                       f"{shape}")
    return shape[self.batch_axis % len(shape)]

  def _lengths(self, lengths, block, what, minimum=0):
    """``lengths`` checked against ``block`` (rows, elements) as an int32
    array, or None. Traced lengths are passed on unchecked."""
    if lengths is None:
      return None
    if self.batch_axis is None:
      raise TypeError(
          f"{what}: lengths (one per row) needs rows: convert the model with "
          "to_step(..., batch_axis=...) (the axis of independent rows of xs, "
          "e.g. 0 for [B, T, ...]); without it every row has one shared "
          "position")
    if isinstance(lengths, jax.core.Tracer):
      return lengths
    rows, k = self._num_rows(block), self._block_length(block)
    arr = np.asarray(lengths)
    if arr.shape != (rows,) or not (np.issubdtype(arr.dtype, np.integer) or
                                    arr.size == 0):
      raise ValueError(f"{what}: lengths must be [{rows}] integers (one per "
                       f"row); got {arr.dtype} {arr.shape}")
    if (arr < minimum).any() or (arr > k).any():
      raise ValueError(f"{what}: lengths must lie in [{minimum}, {k}] (the "
                       f"block has {k} elements along axis {self.axis}); got "
                       f"{arr.tolist()}")
    return jnp.asarray(arr, jnp.int32)

  def _check_room(self, positions, k, lengths, what):
    """A ValueError before a position >= L would be computed (when the state
    needs L and ``positions`` is known)."""
    if positions is not None:
      self.functions.check_room(positions, k, lengths, what)


def _concrete_positions(carry):
  """The carry's positions as a NumPy array, or None under a trace."""
  position = carry.get("position") if isinstance(carry, dict) else None
  if position is None or isinstance(position, jax.core.Tracer):
    return None
  return np.asarray(position)


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _spec(x):
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype")
                              else jnp.result_type(x))


def _drop(shape, axis):
  shape = list(shape)
  del shape[axis]
  return tuple(shape)


def _with_size(shape, axis, n):
  shape = list(shape)
  shape[axis] = n
  return tuple(shape)


def _drop_axis(spec, axis):
  return jax.ShapeDtypeStruct(_drop(spec.shape, axis % len(spec.shape)),
                              spec.dtype)


# -- Stepper -------------------------------------------------------------------
class Stepper:
  """A :class:`StepPair` bound to parameters, holding the carry.

  Each call donates the carry to the compiled step (or extend), so caches
  are updated in place, not copied. Made by :meth:`StepPair.bind`.

  Attributes:
    pair: the StepPair; carry: the current carry; length: L;
    max_length: the pair's (None: no limit on positions).
    position: elements seen since the last :meth:`reset` (with per-row
      ``lengths``, by the row that has seen most); positions: per row.

  Example:
    >>> import jax.numpy as jnp
    >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
    ...                 jnp.ones((6,)))
    >>> stepper = pair.bind(1.0)
    >>> stepper.reset(jnp.ones(2)).tolist()
    [1.0, 2.0]
    >>> stepper.extend(jnp.ones(2)).tolist()
    [3.0, 4.0]
    >>> stepper(jnp.ones(())).tolist()
    5.0
  """

  def __init__(self, pair: StepPair, *unscanned):
    self.pair = pair
    self.length = pair.length
    self.max_length = pair.max_length
    self._unscanned = list(unscanned)
    self.carry = None
    self.position = 0
    self._lag = None      # per row: how far behind ``position`` (ragged)
    self._rows = None
    self.reset()

  @property
  def positions(self):
    """Elements seen per row: ``[B]`` ints with ``batch_axis``, else the
    int :attr:`position`."""
    if self.pair.batch_axis is None:
      return self.position
    lag = 0 if self._lag is None else self._lag
    return np.full(self._rows, self.position, np.int64) - lag

  def reset(self, prompt=None, lengths=None):
    """Starts a sequence.

    Args:
      prompt: None, or P elements (0 <= P <= L) along the pair's axis.
      lengths: with a prompt and the pair's ``batch_axis``: ``[B]`` ints in
        [0, P], row b's prompt being its first ``lengths[b]`` elements.
    Returns:
      None without a prompt; otherwise the outputs for the prompt (0 at a
      row's padded positions).

    Example:
      >>> import jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 1) * w, (1.0,),
      ...                 jnp.ones((2, 6)), axis=1, batch_axis=0)
      >>> stepper = pair.bind(1.0)
      >>> stepper.reset(jnp.ones((2, 3)), lengths=[3, 1]).tolist()
      [[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]]
      >>> stepper(jnp.ones(2)).tolist(), stepper.positions.tolist()
      ([4.0, 2.0], [4, 2])
    """
    pair = self.pair
    if prompt is None:
      if lengths is not None:
        raise TypeError("reset: lengths needs a prompt")
      self.carry = pair._init(self._unscanned, None)
      self.position, self._lag = 0, None
      if pair.batch_axis is not None:
        self._rows = pair._num_rows(pair.xs_spec)
      return None
    lengths = pair._lengths(lengths, prompt, "reset")
    self.carry, out = pair._prefill(self._unscanned, prompt, lengths)
    self.position, self._lag = 0, None
    if pair.batch_axis is not None:
      self._rows = pair._num_rows(prompt)
    self._advance(pair._block_length(prompt), lengths)
    return out

  def extend(self, block, lengths=None):
    """Runs a block of k >= 1 elements at once, continuing the sequence.

    Args:
      block: k elements along the pair's axis.
      lengths: with the pair's ``batch_axis``: ``[B]`` ints in [0, k]; row b
        takes its first ``lengths[b]`` elements.
    Returns:
      The outputs for the block (k elements along the axis; 0 at a row's
      padded positions), as k calls would give them.
    """
    pair = self.pair
    k = pair._block_length(block)
    lengths = pair._lengths(lengths, block, "extend")
    if k == 0:
      raise ValueError("extend takes blocks of at least one element")
    pair._check_room(self.positions, k, lengths, "extend")
    self.carry, ys = pair._extend_donated(self._unscanned, self.carry, block,
                                          lengths)
    self._advance(k, lengths)
    return ys

  def _advance(self, k, lengths):
    if lengths is None:
      self.position += int(k)
      return
    positions = self.positions + np.asarray(lengths)
    self.position = int(np.max(positions, initial=0))
    self._lag = self.position - positions

  def __call__(self, x):
    """Runs one element ``x`` (``axis`` removed) and returns its output."""
    if self.max_length is not None and self.position >= self.max_length:
      raise ValueError(f"the stepper is full: it has seen L={self.length} "
                       "elements; call reset()")
    self.carry, y = self.pair._step_donated(self._unscanned, self.carry, x)
    self.position += 1
    return y
