"""The serving layer: prefill, steps and generation for any causal function.

:class:`StepPair` wraps :func:`scanagram.to_step` for a function
``fun(*unscanned, xs)`` causal along ``axis`` of ``xs``, whose leading
arguments (parameters, model state) are not scanned. It knows no framework:
adapters (``adapters.haiku``; Flax, NNX, Equinox) only build it. It offers

* the functional interface: ``init``, ``prefill``, ``extend``, ``step``,
  ``positions``, compiled once for every parameter value of one shape;
* generation in one compiled loop: ``generate`` (samplers from
  :mod:`scanagram.sampling`, stop tokens, ragged prompts), ``stream`` (the
  same elements, chunk by chunk) and ``beam_search``; ``take_rows`` reorders
  or forks the rows of a carry;
* :class:`Stepper` (``bind``): parameters and a carry held, the carry donated
  to each call so caches are updated in place; ``snapshot``/``restore`` to
  branch from a point of the sequence.

When the unscanned arguments are not known up front
(``StepPair(fun, None, xs, num_unscanned=1)``), the conversion happens at the
first call that has them, from their shapes and dtypes; the pair then serves
arguments of those shapes and dtypes only (one pair, one conversion).
"""
import collections
import numbers
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scanagram import placement
from scanagram.api import StepFunctions, dtype_of as _dtype, to_step

__all__ = ["StepPair", "Stepper", "StepperSnapshot"]

_MISSING = object()


class StepPair:
  """Prefill and step functions of a causal function ``fun(*unscanned, xs)``.

  All functions take the unscanned arguments first: one compiled ``init``,
  ``prefill``, ``extend`` and ``step`` serve every value of the same shapes.

  Args:
    fun: ``fun(*unscanned, xs) -> ys``, causal along ``axis``.
    unscanned: a tuple of examples (arrays or ShapeDtypeStructs) of the
      leading arguments, e.g. ``(params,)`` or ``(params, state)``; or None to
      convert at the first call that has them (then give ``num_unscanned``).
    example_xs: example of ``xs``; fixes L, the most positions served (when
      the state needs L; see ``max_length``).
    axis: the time axis of ``xs``, prompts and outputs.
    has_state: whether the unscanned arguments are ``(params, state)``
      (default: when there are two).
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (0 for ``[B, T, ...]``, 1 for ``[T, B, ...]``): then each row
      has its own position, ``prefill``, ``extend``, ``generate`` take
      per-row ``lengths`` and every carry leaf has the rows first.
    num_unscanned: the number of unscanned arguments (needed when
      ``unscanned`` is None).
    names: the unscanned arguments' names for error messages, e.g.
      ``("params", "state")``.
    unscanned_from: ``unscanned_from(*args) -> tuple``: how :meth:`bind`
      turns its arguments into the unscanned ones (default: as given).
    example_unscanned: ``example_unscanned() -> tuple`` of examples, for a
      lazy pair whose ``functions``, ``carry_spec()`` or ``max_length`` are
      read before the first call (adapters pass their abstract init).

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
    >>> import jax, jax.numpy as jnp
    >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs @ w, axis=0),
    ...                 (jnp.ones((2, 2)),), jnp.ones((8, 2)))
    >>> carry, out = pair.prefill(jnp.eye(2), jnp.ones((3, 2)))
    >>> pair.step(jnp.eye(2), carry, jnp.ones(2))[1].tolist()
    [4.0, 4.0]
    >>> print(pair.max_length)          # a running sum needs no L
    None
    >>> lazy = StepPair(lambda w, xs: jnp.cumsum(xs @ w, axis=0), None,
    ...                 jnp.ones((8, 2)), num_unscanned=1)
    >>> lazy.init(jnp.eye(2))["position"].tolist()   # converted here
    0
  """

  def __init__(self, fun: Callable, unscanned: Optional[Sequence[Any]],
               example_xs, axis: Optional[int] = 0, *,
               has_state: Optional[bool] = None,
               batch_axis: Optional[int] = None,
               num_unscanned: Optional[int] = None,
               names: Optional[Sequence[str]] = None,
               unscanned_from: Optional[Callable[..., Sequence[Any]]] = None,
               example_unscanned: Optional[Callable[[], Sequence[Any]]] = None):
    if unscanned is not None:
      unscanned = tuple(unscanned)
      n = len(unscanned)
      if num_unscanned is not None and int(num_unscanned) != n:
        raise ValueError(f"num_unscanned={num_unscanned}, but {n} unscanned "
                         "examples were given")
    elif num_unscanned is not None:
      n = int(num_unscanned)
    elif names is not None:
      n = len(names)
    else:
      raise TypeError("StepPair needs examples of the unscanned arguments, "
                      "or num_unscanned (their number) to convert at the "
                      "first call that has them")
    if n < 0:
      raise ValueError(f"num_unscanned must be >= 0; got {n}")
    if names is not None and len(names) != n:
      raise ValueError(f"names has {len(names)} entries for {n} unscanned "
                       "arguments")
    self.num_unscanned = n
    self.has_state = (n == 2 if has_state is None else bool(has_state))
    if axis is None:   # not given: 0, unless the example looks batch-major
      axis = 0
      _warn_if_batch_major(example_xs, batch_axis)
    self.axis = axis
    self.batch_axis = batch_axis
    self.xs_spec = jax.tree.map(_spec, example_xs)
    self.element_spec = jax.tree.map(lambda s: _drop_axis(s, axis),
                                     self.xs_spec)
    self.length = _length(self.xs_spec, axis)
    self.trace_counts = collections.Counter()
    self._fun = fun
    self._arg_names = None if names is None else tuple(names)
    self._unscanned_from = unscanned_from
    self._example_unscanned = example_unscanned
    self._functions = None        # StepFunctions, once converted
    self._unscanned_flat = None   # [(leaf specs, treedef)] it was made with
    self._converted_by = None
    self._jit_functions()
    if unscanned is not None or n == 0:
      self._convert(unscanned or (), "the examples given to StepPair")

  def _jit_functions(self):
    """The compiled functions. Each converts on its first trace when the pair
    has not been converted yet (adapters may call them directly)."""
    def counted(name, f):
      def traced(*args, **kwargs):
        self.trace_counts[name] += 1
        return f(*args, **kwargs)
      return traced

    fns = self._functions_for
    step = counted("step", lambda u, carry, x: fns(u, "step").step(
        *u, carry, x))
    extend = counted("extend", lambda u, carry, block, lengths: fns(
        u, "extend").extend(*u, carry, block, lengths=lengths))
    self._init = jax.jit(counted("init", lambda u, batch_size: fns(
        u, "init").init(*u, batch_size=batch_size)), static_argnums=1)
    self._prefill = jax.jit(counted(
        "prefill", lambda u, prompt, lengths: fns(u, "prefill").prefill(
            *u, prompt, lengths=lengths)))
    self._step = jax.jit(step)
    self._step_donated = jax.jit(step, donate_argnums=1)
    self._extend = jax.jit(extend)
    self._extend_donated = jax.jit(extend, donate_argnums=1)
    self._take_rows = jax.jit(_take_rows)
    self._sharded_inits = {}   # init with out_shardings, per shardings
    generation = ("sample", "stop", "pad")
    self._generate = jax.jit(counted("generate", self._generation),
                             static_argnames=("steps",) + generation)
    self._stream_first = jax.jit(counted("stream_first", self._first_chunk),
                                 static_argnames=generation)
    # the loop state (carry, last element, stopped) belongs to the iterator
    self._stream_next = jax.jit(counted("stream_next", self._next_chunk),
                                static_argnames=generation, donate_argnums=1)
    self._beam = jax.jit(counted("beam_search", self._beam_loop),
                         static_argnames=("steps", "beam"))

  def __repr__(self):
    rows = "" if self.batch_axis is None else f"batch_axis={self.batch_axis}, "
    return (f"StepPair(axis={self.axis}, {rows}length={self.length}, "
            f"has_state={self.has_state}, xs_spec={self.xs_spec})")

  # -- conversion ------------------------------------------------------------
  @property
  def functions(self) -> StepFunctions:
    """The underlying :class:`scanagram.StepFunctions` (a lazy pair not yet
    called converts from ``example_unscanned``, or raises RuntimeError)."""
    if self._functions is None:
      self._convert_from_example("functions")
    return self._functions

  def _convert(self, unscanned, source):
    n, rows = self.num_unscanned, self.batch_axis
    specs = tuple(jax.tree.map(_spec, u) for u in unscanned)
    self._functions = to_step(
        self._fun, *specs, self.xs_spec,
        in_axes=(None,) * n + (self.axis,), out_axes=self.axis,
        batch_axes=None if rows is None else (None,) * n + (rows,),
        out_batch_axes=rows)
    self._unscanned_flat = [jax.tree.flatten(s) for s in specs]
    self._converted_by = source

  def _convert_from_example(self, what):
    call = (f"call init, prefill, step, generate or bind with the "
            f"{self._names()} first")
    if self._example_unscanned is None:
      raise RuntimeError(
          f"{what}: this StepPair converts at its first call with the "
          f"{self._names()} (their shapes fix the conversion); {call}")
    try:
      examples = tuple(self._example_unscanned())
    except Exception as e:
      raise RuntimeError(
          f"{what}: this StepPair is not converted yet and examples of the "
          f"{self._names()} could not be made ({type(e).__name__}: {e}); "
          f"{call}") from e
    if len(examples) != self.num_unscanned:
      raise TypeError(f"example_unscanned returned {len(examples)} values "
                      f"for {self.num_unscanned} unscanned arguments")
    self._convert(examples, f"examples made when {what} was read before "
                  "the first call")

  def _ensure(self, unscanned, what):
    """Converts from ``unscanned`` at the first call; later, checks that they
    have the structure, shapes and dtypes the pair was converted with."""
    if self._functions is None:
      self._convert(unscanned, f"the first call ({what})")
      return
    for i, (u, (want, tree)) in enumerate(zip(unscanned,
                                              self._unscanned_flat)):
      leaves, got_tree = jax.tree.flatten(u)
      if got_tree != tree or any(
          _shape(x) != s.shape or _dtype(x) != s.dtype
          for x, s in zip(leaves, want)):
        raise TypeError(self._difference(i, u, jax.tree.unflatten(tree, want),
                                         what))

  def _difference(self, i, got, want, what):
    """What differs between ``got`` and the example ``want`` of unscanned
    argument i, leaf by leaf."""
    name = self._arg_name(i)
    differs = leaf_differences(got, want, name, "the converted", "was")
    return (f"{what}: {name} differs from the one this StepPair was "
            f"converted with (by {self._converted_by}): "
            f"{differs}. One pair serves one structure, "
            f"shapes and dtypes; convert another pair for these")

  def _functions_for(self, unscanned, what):
    self._ensure(unscanned, what)
    return self._functions

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
    return carry["position"]

  def init(self, *unscanned, batch_size: Optional[int] = None,
           shardings=None):
    """The carry before any element.

    Args:
      *unscanned: ``params`` (and ``state`` for stateful models).
      batch_size: with ``batch_axis``, the number of rows (default: the
        example's).
      shardings: one sharding per carry leaf (:meth:`carry_shardings`):
        the carry is made with them, not replicated on every device.
    Returns:
      The carry (a dict of arrays: caches, recurrent states, ``position``).
    """
    if batch_size is not None and self.batch_axis is None:
      raise TypeError("init: batch_size needs rows: convert with "
                      "to_step(..., batch_axis=...)")
    unscanned = self._unscanned(unscanned, "init")
    size = None if batch_size is None else int(batch_size)
    if shardings is None:
      return self._init(unscanned, size)
    leaves, tree = jax.tree.flatten(shardings)
    key = (tree, tuple(leaves))
    if key not in self._sharded_inits:
      self._sharded_inits[key] = jax.jit(self._init, static_argnums=1,
                                         out_shardings=shardings)
    return self._sharded_inits[key](unscanned, size)

  def carry_shardings(self, *unscanned, prompt_sharding):
    """A sharding per carry leaf (the carry's structure): where XLA places
    the carry of a prefill whose prompt has ``prompt_sharding`` and whose
    parameters have theirs. With them :meth:`init` makes a carry that is
    sharded like the caches a sharded prefill gives (batch over the data
    axis, heads over the model axis), and steps keep it so.

    Args:
      *unscanned: the parameters (and state), as arrays placed on the mesh
        or ``jax.ShapeDtypeStruct``s with shardings.
      prompt_sharding: the prompt's sharding: a ``NamedSharding``, or a
        ``PartitionSpec`` under ``jax.set_mesh``.
    """
    unscanned = self._unscanned(unscanned, "carry_shardings")
    specs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(_shape(x), _dtype(x),
                                       sharding=getattr(x, "sharding", None)),
        unscanned)
    prompt = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(_with_size(s.shape, self._axis_of(s),
                                                  1), s.dtype,
                                       sharding=prompt_sharding),
        self.xs_spec)
    compiled = jax.jit(lambda u, p: self._prefill(u, p, None)[0]).lower(
        specs, prompt).compile()
    return compiled.output_shardings

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

  def bind(self, *args, shardings=None) -> "Stepper":
    """A :class:`Stepper` holding the unscanned arguments (made from
    ``args`` by ``unscanned_from``) and a carry; with ``shardings``
    (:meth:`carry_shardings`) a reset without a prompt makes the carry with
    them."""
    unscanned = args if self._unscanned_from is None else tuple(
        self._unscanned_from(*args))
    return Stepper(self, *self._unscanned(unscanned, "bind"),
                   shardings=shardings)

  def take_rows(self, carry, indices):
    """The carry of rows ``indices`` of ``carry``: reorders, drops or forks
    rows (an index may repeat). Needs ``batch_axis``; ``indices`` are ints
    in [0, B) and give the new number of rows.

    Example:
      >>> import jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 1) * w, (1.0,),
      ...                 jnp.ones((2, 6)), axis=1, batch_axis=0)
      >>> carry, _ = pair.prefill(1.0, jnp.ones((2, 3)), lengths=[3, 1])
      >>> pair.positions(pair.take_rows(carry, [1, 0, 0])).tolist()
      [1, 3, 3]
    """
    if self.batch_axis is None:
      raise TypeError("take_rows needs rows: convert with to_step(..., "
                      "batch_axis=...); without it the rows share one carry")
    if not isinstance(indices, jax.core.Tracer):
      arr = np.asarray(indices)
      rows = np.shape(self.positions(carry))[0]
      if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or
                               arr.size == 0):
        raise ValueError(f"take_rows: indices must be a 1-d array of ints; "
                         f"got {arr.dtype} {arr.shape}")
      if ((arr < 0) | (arr >= rows)).any():
        raise ValueError(f"take_rows: indices must lie in [0, {rows}) (the "
                         f"carry has {rows} rows); got {arr.tolist()}")
      indices = jnp.asarray(arr, jnp.int32)
    return self._take_rows(carry, indices)

  # -- generation ------------------------------------------------------------
  def generate(self, *args, prompt=_MISSING, steps=_MISSING, sample=_MISSING,
               rng=None, lengths=None, stop_tokens=None, pad=0):
    """Generates ``steps`` elements in one compiled loop.

    ``generate(*unscanned, prompt, steps, sample, rng=None, *, lengths=None,
    stop_tokens=None, pad=0)``; ``prompt``, ``steps``, ``sample`` and ``rng``
    may be passed by position or by name. The first element is
    ``sample(rng_0, the prompt's last output)``, each next one
    ``sample(rng_i, the step's output for the previous element)``, with
    ``rng_0 .. rng_{steps-1} = jax.random.split(rng, steps)``. The carry
    lives inside the compiled loop and is updated in place.

    Args:
      *args: ``params`` (and ``state``), then optionally ``prompt``,
        ``steps``, ``sample``, ``rng``.
      prompt: P >= 1 elements along ``axis``.
      steps: the number of elements to generate.
      sample: ``sample(rng, y) -> x``, ``x`` shaped like one input element
        (see :mod:`scanagram.sampling`). Pass the same (or an equal) sampler
        each time to reuse the compiled loop.
      rng: a key or an int seed (default 0).
      lengths: with ``batch_axis`` only: ``[B]`` ints in [1, P]; row b's
        prompt is its first ``lengths[b]`` elements. Its first generated
        element is sampled from its output at position ``lengths[b] - 1``,
        and it goes on from there, each row from its own position.
      stop_tokens: integer token ids (the elements must be integer ids).
        An entry that emits one of them (it is kept) is done: its later
        entries are ``pad``. With ``batch_axis`` a row is done when all its
        entries are, and its carry stops advancing; without it the rows share
        one position, so the carry advances on ``pad`` and only the outputs
        are padded. The loop ends early when every entry is done.
      pad: the element written after a stop token.
    Returns:
      The generated elements, ``steps`` of them stacked along ``axis``.

    Raises:
      ValueError: ``P + steps - 1 > L`` (with ``lengths``,
        ``max(lengths) + steps - 1 > L``) when ``max_length`` is not None;
        a pair whose state does not need L (an RNN) generates any number.
      TypeError: ``lengths`` without ``batch_axis``; ``stop_tokens`` with
        elements that are not one integer array.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> pair.generate(1.0, jnp.ones(2), 3, lambda k, y: y).tolist()
      [2.0, 4.0, 8.0]
      >>> pair.generate(1.0, jnp.ones(2), 8, lambda k, y: y)[-1].item()  # past L
      256.0
    """
    unscanned, prompt, steps, sample, rng, lengths, stop, pad = (
        self._generation_args("generate", args, prompt, steps, sample, rng,
                              lengths, stop_tokens, pad))
    tokens, _ = self._generate(unscanned, prompt, lengths, rng, steps=steps,
                               sample=sample, stop=stop, pad=pad)
    return tokens

  def stream(self, *args, prompt=_MISSING, steps=_MISSING, sample=_MISSING,
             rng=None, lengths=None, stop_tokens=None, pad=0, chunk=16):
    """:meth:`generate`, chunk by chunk: an iterator of arrays of at most
    ``chunk`` elements along ``axis``.

    Same arguments as :meth:`generate`; the concatenation of the chunks along
    ``axis`` equals what ``generate`` returns for the same arguments and
    ``rng``. Each chunk is one compiled loop; every full chunk after the
    first reuses one compiled function. Nothing is yielded for ``steps=0``.

    Example:
      >>> import jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> [c.tolist() for c in pair.stream(1.0, jnp.ones(2), 5,
      ...                                  lambda k, y: y, chunk=2)]
      [[2.0, 4.0], [8.0, 16.0], [32.0]]
    """
    unscanned, prompt, steps, sample, rng, lengths, stop, pad = (
        self._generation_args("stream", args, prompt, steps, sample, rng,
                              lengths, stop_tokens, pad))
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or (
        chunk < 1):
      raise ValueError(f"stream: chunk must be an int >= 1; got {chunk!r}")
    # generate's keys: the same split, so the same elements
    keys = jax.random.split(rng, steps) if steps else None
    return self._chunks(unscanned, prompt, lengths, keys, steps, sample, stop,
                        pad, int(chunk))

  def _chunks(self, unscanned, prompt, lengths, keys, steps, sample, stop,
              pad, chunk):
    if steps == 0:
      return
    options = dict(sample=sample, stop=stop, pad=pad)
    first = min(chunk, steps)
    state, xs = self._stream_first(unscanned, prompt, lengths, keys[:first],
                                   **options)
    yield xs
    for start in range(first, steps, chunk):
      state, xs = self._stream_next(unscanned, state,
                                    keys[start:start + chunk], **options)
      yield xs

  def beam_search(self, *args, prompt=_MISSING, steps=_MISSING,
                  beam_size=_MISSING, lengths=None):
    """The ``beam_size`` most likely continuations found by beam search.

    ``beam_search(*unscanned, prompt, steps, beam_size, *, lengths=None) ->
    (tokens, scores)``. The elements are integer token ids (``[B]`` per
    step) and the outputs logits (``[B, V]`` per step). Each row's prompt
    is expanded to ``beam_size`` rows of the carry (:meth:`take_rows`); at
    each step every beam is extended by every token and the ``beam_size``
    best of them are kept, their carries reordered, all in one compiled
    loop. Needs ``batch_axis``.

    Args:
      *args: ``params`` (and ``state``), then optionally ``prompt``,
        ``steps``, ``beam_size`` (or by name).
      prompt: P >= 1 tokens along ``axis``.
      steps: >= 1 tokens to generate.
      beam_size: >= 1 beams per row.
      lengths: ``[B]`` ints in [1, P], as for :meth:`generate`.
    Returns:
      ``tokens``: ``[B, beam_size, steps]``, best first; ``scores``:
      ``[B, beam_size]`` float32, each the sum of the log-softmax of the
      tokens chosen (-inf for beams beyond the number of distinct
      continuations).
    """
    unscanned, values = self._named_args(
        "beam_search", args, ("prompt", "steps", "beam_size"),
        dict(prompt=prompt, steps=steps, beam_size=beam_size))
    if self.batch_axis is None:
      raise TypeError("beam_search needs rows: convert with to_step(..., "
                      "batch_axis=...) so that each beam has its own carry")
    element = self.element_spec
    if not isinstance(element, jax.ShapeDtypeStruct) or len(
        element.shape) != 1 or not jnp.issubdtype(element.dtype, jnp.integer):
      raise TypeError(f"beam_search: the elements must be integer token ids, "
                      f"one per row ([B]); the pair's element is {element}")
    beam = values["beam_size"]
    if isinstance(beam, bool) or not isinstance(beam, numbers.Integral) or (
        beam < 1):
      raise ValueError(f"beam_search: beam_size must be an int >= 1; got "
                       f"{beam!r}")
    prompt, steps, lengths = self._prompt_and_steps(
        "beam_search", values["prompt"], values["steps"], lengths)
    if steps < 1:
      raise ValueError("beam_search: steps must be >= 1")
    return self._beam(unscanned, prompt, lengths, steps=steps, beam=int(beam))

  # -- generation: argument checks -------------------------------------------
  def _named_args(self, what, args, names, given, optional=()):
    """The unscanned arguments (converting at the first call) and the values
    of ``names``: positional after them, else by keyword; all required but
    the ``optional`` ones."""
    n = self.num_unscanned
    shown = [name if name not in optional else f"[{name}]" for name in names]
    usage = f"{what} takes {self._names()}, then {', '.join(shown)}"
    if len(args) < n or len(args) > n + len(names):
      raise TypeError(f"{usage}; got {len(args)} positional arguments")
    values = dict(zip(names, args[n:]))
    for name, value in given.items():
      if value is _MISSING:
        continue
      if name in values:
        raise TypeError(f"{what}: {name} was given by position and by name")
      values[name] = value
    missing = [name for name in names
               if name not in values and name not in optional]
    if missing:
      raise TypeError(f"{usage}; {', '.join(missing)} missing")
    unscanned = list(args[:n])
    self._ensure(unscanned, what)
    return unscanned, values

  def _generation_args(self, what, args, prompt, steps, sample, rng, lengths,
                       stop_tokens, pad):
    unscanned, values = self._named_args(
        what, args, ("prompt", "steps", "sample", "rng"),
        dict(prompt=prompt, steps=steps, sample=sample,
             rng=_MISSING if rng is None else rng), optional=("rng",))
    prompt, steps, lengths = self._prompt_and_steps(
        what, values["prompt"], values["steps"], lengths)
    stop, pad = self._stop_tokens(what, stop_tokens, pad)
    rng = values.get("rng")
    if rng is None:
      rng = 0
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(rng)
    return unscanned, prompt, steps, values["sample"], rng, lengths, stop, pad

  def _prompt_and_steps(self, what, prompt, steps, lengths):
    """Checks a prompt (P >= 1 elements), ``lengths`` and the room for
    ``steps`` generated elements (P + steps - 1 positions)."""
    steps = int(steps)
    sizes = {np.shape(x)[a] for x, a in
             zip(jax.tree.leaves(prompt), self._leaf_axes(prompt))}
    if len(sizes) != 1:
      raise ValueError(f"{what}: the prompt's leaves have different "
                       f"lengths along axis {self.axis}: {sorted(sizes)}")
    p = sizes.pop()
    if p < 1:
      raise ValueError(f"{what} needs a prompt of at least 1 element: the "
                       "first sample is drawn from the prompt's last output")
    lengths = self._lengths(lengths, prompt, what, minimum=1)
    used = p
    if lengths is not None and not isinstance(lengths, jax.core.Tracer):
      used = int(np.max(np.asarray(lengths), initial=1))
    limit = self.max_length
    if steps < 0 or (limit is not None and used + steps - 1 > limit):
      longest = "a prompt" if lengths is None else "a longest prompt"
      raise ValueError(
          f"{what}: {longest} of {used} elements and {steps} steps need "
          f"{used + max(steps - 1, 0)} positions, and 0 <= steps with P + "
          f"steps - 1 <= L={limit} (the state holds L positions); shorten "
          f"the prompt or generate fewer steps")
    return prompt, steps, lengths

  def _stop_tokens(self, what, stop_tokens, pad):
    """``(stop, pad)``: the stop tokens as a tuple of ints (None: none) and
    ``pad`` as an int, checked against the elements (integer ids)."""
    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral):
      raise TypeError(f"{what}: pad must be an int token id; got {pad!r}")
    if stop_tokens is None:
      return None, int(pad)
    element = self.element_spec
    if not isinstance(element, jax.ShapeDtypeStruct) or not jnp.issubdtype(
        element.dtype, jnp.integer):
      raise TypeError(f"{what}: stop_tokens needs elements that are integer "
                      f"token ids (one integer array); the pair's element is "
                      f"{element}")
    arr = np.asarray(stop_tokens)
    if arr.ndim > 1 or (arr.size and (arr.dtype == bool or not np.issubdtype(
        arr.dtype, np.integer))):
      raise TypeError(f"{what}: stop_tokens must be a sequence of int token "
                      f"ids; got {stop_tokens!r}")
    stop = tuple(int(s) for s in arr.reshape(-1))
    return (stop or None), int(pad)

  # -- generation: the compiled loops ----------------------------------------
  def _generation(self, unscanned, prompt, lengths, rng, steps, sample, stop,
                  pad):
    """``(elements, carry)``: ``steps`` elements stacked along ``axis``, and
    the carry after the last step (the last element is not run)."""
    if steps == 0:
      return jax.tree.map(
          lambda x: jnp.zeros(_with_size(x.shape, self._axis_of(x), 0),
                              x.dtype), prompt), None
    keys = jax.random.split(rng, steps)
    state, first = self._start(unscanned, prompt, lengths, keys[0], sample,
                               stop)
    state, rest = self._continue(unscanned, state, keys[1:], sample, stop,
                                 pad)
    return self._stacked(first, rest), state[0]

  def _first_chunk(self, unscanned, prompt, lengths, keys, sample, stop, pad):
    state, first = self._start(unscanned, prompt, lengths, keys[0], sample,
                               stop)
    state, rest = self._continue(unscanned, state, keys[1:], sample, stop,
                                 pad)
    return state, self._stacked(first, rest)

  def _next_chunk(self, unscanned, state, keys, sample, stop, pad):
    state, xs = self._continue(unscanned, state, keys, sample, stop, pad)
    return state, jax.tree.map(
        lambda x: jnp.moveaxis(x, 0, self._axis_of(x)), xs)

  def _start(self, unscanned, prompt, lengths, key, sample, stop):
    """Prefill and the first element: ``((carry, x, done), x)``; ``done``
    (per entry of x: it emitted a stop token) is None without stop
    tokens."""
    fns = self._functions_for(unscanned, "generate")
    carry, out = fns.prefill(*unscanned, prompt, lengths=lengths)
    last = self._last_outputs(out, lengths)
    x = self._checked_sample(sample, key, last, _element_of(
        prompt, self._axis_of))
    done = None if stop is None else jnp.isin(x, jnp.asarray(stop, x.dtype))
    return (carry, x, done), x

  def _continue(self, unscanned, state, keys, sample, stop, pad):
    """One element per key from ``state``: ``(state, xs)``, ``xs`` stacked
    on a new leading axis."""
    fns = self._functions_for(unscanned, "generate")
    element = jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)),
                           state[1])
    if stop is None:
      def body(state, key):
        carry, x, done = state
        carry, y = fns.step(*unscanned, carry, x)
        x = self._checked_sample(sample, key, y, element)
        return (carry, x, done), x
      return lax.scan(body, state, keys)

    # Stopped entries write pad; a while loop ends once all have stopped.
    x = state[1]
    n = keys.shape[0]
    stops = jnp.asarray(stop, x.dtype)
    pad = jnp.asarray(pad, x.dtype)

    def running(loop):
      i, (_, _, done), _ = loop
      return (i < n) & ~jnp.all(done)

    def body(loop):
      i, (carry, x, done), out = loop
      carry, y = self._advance(fns, unscanned, carry, x, done)
      x = jnp.where(done, pad, self._checked_sample(sample, keys[i], y,
                                                    element))
      done = done | jnp.isin(x, stops)
      out = lax.dynamic_update_index_in_dim(out, x, i, 0)
      return i + 1, (carry, x, done), out

    out = jnp.full((n,) + x.shape, pad, x.dtype)
    _, state, out = lax.while_loop(running, body, (0, state, out))
    return state, out

  def _advance(self, fns, unscanned, carry, x, done):
    """A step on ``x`` in which, with rows, a row whose entries are all done
    stays where it is (a block of one with lengths 0 or 1)."""
    if self.batch_axis is None:
      return fns.step(*unscanned, carry, x)
    r = self._element_row_axis(x.ndim)
    active = ~jnp.all(done, axis=tuple(d for d in range(x.ndim) if d != r))
    block = jnp.expand_dims(x, self._axis_of(x, 1))
    carry, ys = fns.extend(*unscanned, carry, block,
                           lengths=active.astype(jnp.int32))
    return carry, jax.tree.map(
        lambda y: jnp.take(y, 0, axis=self._axis_of(y)), ys)

  def _beam_loop(self, unscanned, prompt, lengths, steps, beam):
    fns = self._functions_for(unscanned, "beam_search")
    carry, out = fns.prefill(*unscanned, prompt, lengths=lengths)
    logits = self._rows_first(self._last_outputs(out, lengths))   # [B, V]
    rows, vocab = logits.shape
    dtype = self.element_spec.dtype
    # Every row becomes `beam` rows; at first only beam 0 is live (the others
    # score -inf), so the first choice takes the best tokens of one prompt.
    carry = _take_rows(carry, jnp.repeat(jnp.arange(rows), beam))
    scores = jnp.broadcast_to(jnp.where(jnp.arange(beam) == 0, 0.0,
                                        -jnp.inf), (rows, beam))
    tokens = jnp.zeros((rows, beam, steps), dtype)

    def choose(logits, scores, tokens, t):
      """The best `beam` extensions of each row's beams: new scores and
      tokens, and each one's source row of the carry."""
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      total = (scores[..., None] + logp).reshape(rows, beam * vocab)
      scores, best = lax.top_k(total, beam)
      source, token = best // vocab, (best % vocab).astype(dtype)
      tokens = jnp.take_along_axis(tokens, source[..., None], axis=1)
      tokens = tokens.at[:, :, t].set(token)
      return scores, tokens, (jnp.arange(rows)[:, None] * beam
                              + source).reshape(-1)

    scores, tokens, source = choose(
        jnp.broadcast_to(logits[:, None], (rows, beam, vocab)), scores,
        tokens, 0)
    carry = _take_rows(carry, source)

    def body(loop, t):
      carry, scores, tokens = loop
      carry, y = fns.step(*unscanned, carry, tokens[:, :, t - 1].reshape(-1))
      scores, tokens, source = choose(
          self._rows_first(y).reshape(rows, beam, vocab), scores, tokens, t)
      return (_take_rows(carry, source), scores, tokens), None

    (_, scores, tokens), _ = lax.scan(body, (carry, scores, tokens),
                                      jnp.arange(1, steps))
    return tokens, scores

  def _last_outputs(self, out, lengths):
    """Each row's output for the last element of its prompt."""
    if lengths is None:
      return jax.tree.map(lambda y: jnp.take(y, -1, axis=self._axis_of(y)),
                          out)
    return jax.tree.map(lambda y: self._at_rows(y, lengths - 1), out)

  def _rows_first(self, y):
    """A step's logits with the rows first: ``[B, V]``."""
    if not isinstance(y, jax.Array) or y.ndim != 2:
      raise TypeError(f"beam_search: the outputs must be logits, one array "
                      f"[B, V] per step; got {jax.tree.map(_spec, y)}")
    return jnp.moveaxis(y, self._element_row_axis(y.ndim), 0)

  def _stacked(self, first, rest):
    """The first element and the rest (on a leading axis), along ``axis``."""
    return jax.tree.map(
        lambda x, xs: jnp.moveaxis(jnp.concatenate([x[None], xs]), 0,
                                   self._axis_of(x, 1)), first, rest)

  def _at_rows(self, y, index):
    """``y``'s element at position ``index[b]`` along ``axis``, for each row
    b (``axis`` removed)."""
    a, r = self._axis_of(y), self.batch_axis % y.ndim
    moved = jnp.moveaxis(y, (a, r), (0, 1))
    picked = moved[index, jnp.arange(moved.shape[1])]
    return jnp.moveaxis(picked, 0, r - (r > a))

  def _element_row_axis(self, ndim):
    """The rows' axis in one element of ``ndim`` dims (``axis`` removed)."""
    r, a = self.batch_axis % (ndim + 1), self.axis % (ndim + 1)
    return r - (r > a)

  def _checked_sample(self, sample, key, y, want):
    x = sample(key, y)
    got = jax.tree.map(lambda v: (_spec(v).shape, jnp.dtype(_spec(v).dtype)),
                       x)
    if got != want:
      raise TypeError(f"generate: sample(rng, y) returned {got} (shape, "
                      f"dtype), but the model's input element is {want}")
    return x

  # -- helpers ---------------------------------------------------------------
  def _arg_name(self, i):
    if self._arg_names is not None:
      return self._arg_names[i]
    if self.num_unscanned == 1:
      return "params"
    if self.num_unscanned == 2 and self.has_state:
      return ("params", "state")[i]
    return f"unscanned argument {i}"

  def _names(self):
    if self._arg_names is not None:
      return ", ".join(self._arg_names) or "no unscanned arguments"
    if self.num_unscanned == 1:
      return "params"
    if self.num_unscanned == 2 and self.has_state:
      return "params, state"
    return f"{self.num_unscanned} unscanned arguments"

  def _unscanned(self, args, what):
    return self._split(args, 0, what, "")

  def _split(self, args, extra, what, names):
    """Checks the number of arguments (the unscanned ones, then ``extra``)
    and converts at the first call."""
    if len(args) != self.num_unscanned + extra:
      raise TypeError(f"{what} takes {self._names()}{names}; got "
                      f"{len(args)} arguments")
    args = list(args)
    self._ensure(args[:self.num_unscanned], what)
    return args

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


def _take_rows(carry, indices):
  """Rows ``indices`` of every carry leaf (with rows, each has them first)."""
  return jax.tree.map(lambda c: jnp.take(c, indices, axis=0), carry)


def _element_of(prompt, axis_of):
  """``(shape, dtype)`` of one element of ``prompt``, leaf by leaf."""
  return jax.tree.map(
      lambda x: (_drop(x.shape, axis_of(x)), jnp.dtype(x.dtype)), prompt)


def _length(xs_spec, axis):
  """L: the examples' common length along ``axis``."""
  lengths = set()
  for spec in jax.tree.leaves(xs_spec):
    if not spec.shape:
      raise ValueError(f"example_xs needs the time axis {axis} on every "
                       f"leaf; got a scalar")
    lengths.add(spec.shape[axis % len(spec.shape)])
  if len(lengths) != 1:
    raise ValueError(f"the leaves of example_xs must share their length "
                     f"along axis {axis}; got lengths {sorted(lengths)}")
  return lengths.pop()


def leaf_differences(got, want, name: str, source: str, theirs: str) -> str:
  """Where ``got`` differs from ``want`` (ShapeDtypeStructs) in structure,
  shape or dtype, leaf by leaf, for an error message ("" when alike):
  ``name`` names the tree, ``source`` the one ``want`` comes from ("the
  converted"), ``theirs`` introduces want's value ("was")."""
  got_leaves, want_leaves = dict(_with_paths(got)), dict(_with_paths(want))
  parts = [f"{name}{p} is missing" for p in want_leaves
           if p not in got_leaves]
  parts += [f"{name}{p} is not in {source} {name}" for p in got_leaves
            if p not in want_leaves]
  for p, x in got_leaves.items():
    s = want_leaves.get(p)
    if s is not None and (_shape(x) != s.shape or _dtype(x) != s.dtype):
      parts.append(f"{name}{p} is {_dtype(x).name}{list(_shape(x))}, "
                   f"{theirs} {s.dtype.name}{list(s.shape)}")
  if not parts and jax.tree.structure(got) != jax.tree.structure(want):
    parts = [f"{name} has structure {jax.tree.structure(got)}, {theirs} "
             f"{jax.tree.structure(want)}"]
  more = f" (and {len(parts) - 4} more)" if len(parts) > 4 else ""
  return "; ".join(parts[:4]) + more


def _with_paths(tree):
  return [(jax.tree_util.keystr(path), x) for path, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


def _concrete_positions(carry):
  """The carry's positions as a NumPy array, or None under a trace."""
  position = carry.get("position") if isinstance(carry, dict) else None
  if position is None or isinstance(position, jax.core.Tracer):
    return None
  return np.asarray(position)


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def advanced(position: int, positions, k: int, lengths, lag):
  """A stepper's ``(position, lag)`` after a block of k elements: every row
  takes k (``lengths`` None), or row b takes ``lengths[b]``; ``position``
  is then the furthest row's, ``lag`` how far each row is behind it."""
  if lengths is None:
    return position + int(k), lag
  positions = positions + np.asarray(lengths)
  position = int(np.max(positions, initial=0))
  return position, position - positions


def _warn_if_batch_major(example_xs, batch_axis):
  """Warns when the default time axis 0 looks like a batch axis: the
  example's axis 1 is longer (``[B, T, ...]`` converted over B steps one
  row at a time, silently not what was meant)."""
  for x in jax.tree.leaves(example_xs):
    shape = _shape(x)
    if len(shape) >= 2 and shape[1] > shape[0] and batch_axis != 1:
      warnings.warn(
          f"converting along the default axis 0 (length {shape[0]}) of an "
          f"example of shape {tuple(shape)} whose axis 1 is longer: if it "
          "is batch-major [B, T, ...], pass axis=1 (and batch_axis=0 for a "
          "position per row); pass axis=0 to silence this",
          UserWarning, stacklevel=4)
      return


def _spec(x):
  """``x``'s ShapeDtypeStruct (with its explicit sharding, if any)."""
  return placement.struct_of(x, _dtype(x))


def _drop(shape, axis):
  shape = list(shape)
  del shape[axis]
  return tuple(shape)


def _with_size(shape, axis, n):
  shape = list(shape)
  shape[axis] = n
  return tuple(shape)


def _drop_axis(spec, axis):
  return placement.resized(spec, axis % len(spec.shape), None)


def _copy(tree):
  """New buffers: a later donation of ``tree`` leaves the copy alive."""
  return jax.tree.map(lambda x: x.copy(), tree)


# -- Stepper -------------------------------------------------------------------
class StepperSnapshot(NamedTuple):
  """A :class:`Stepper`'s state at one point (:meth:`Stepper.snapshot`)."""
  carry: Any
  position: int
  lag: Optional[np.ndarray]
  rows: Optional[int]


class Stepper:
  """A :class:`StepPair` bound to parameters, holding the carry.

  Each call donates the carry to the compiled step (or extend), so caches
  are updated in place, not copied. Made by :meth:`StepPair.bind`.

  Attributes:
    pair: the StepPair; carry: the current carry; length: L;
    max_length: the pair's (None: no limit on positions); shardings: the
    carry shardings a reset without a prompt makes the carry with.
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

  def __init__(self, pair: StepPair, *unscanned, shardings=None):
    self.pair = pair
    self.shardings = shardings
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
      self.carry = pair.init(*self._unscanned, shardings=self.shardings)
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
    self.position, self._lag = advanced(self.position, self.positions, k,
                                        lengths, self._lag)

  def __call__(self, x):
    """Runs one element ``x`` (``axis`` removed) and returns its output."""
    if self.max_length is not None and self.position >= self.max_length:
      raise ValueError(f"the stepper is full: it has seen L={self.length} "
                       "elements; call reset()")
    self.carry, y = self.pair._step_donated(self._unscanned, self.carry, x)
    self.position += 1
    return y

  def snapshot(self) -> StepperSnapshot:
    """A copy of the carry and positions, which later (donating) calls leave
    intact: :meth:`restore` goes back to it, as often as wanted.

    Example:
      >>> import jax.numpy as jnp
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> stepper = pair.bind(1.0)
      >>> _ = stepper.reset(jnp.ones(2))
      >>> saved = stepper.snapshot()
      >>> stepper(jnp.ones(())).tolist(), stepper(jnp.ones(())).tolist()
      (3.0, 4.0)
      >>> stepper.restore(saved)
      >>> stepper(jnp.ones(())).tolist(), stepper.position
      (3.0, 3)
    """
    lag = None if self._lag is None else np.array(self._lag)
    return StepperSnapshot(_copy(self.carry), self.position, lag, self._rows)

  def restore(self, snapshot: StepperSnapshot):
    """Continues from ``snapshot`` (taken from a stepper of the same pair);
    the snapshot stays usable."""
    got = jax.tree.structure(snapshot.carry)
    want = jax.tree.structure(self.carry)
    if got != want:
      raise TypeError(f"restore: the snapshot's carry has structure {got}; "
                      f"this stepper's has {want} (a snapshot of another "
                      "pair?)")
    # a copy: the next call donates the carry, the snapshot keeps its own
    self.carry = _copy(snapshot.carry)
    self.position = snapshot.position
    self._lag = None if snapshot.lag is None else np.array(snapshot.lag)
    self._rows = snapshot.rows
