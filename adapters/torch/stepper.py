"""TorchStepper: a derived step as a stateful object called from PyTorch."""
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from scanagram import stepping
from scanagram.export import ExportedPair

from ._dlpack import jax_dtype_of, jit_argument, to_torch, tree_to_jax


# -- checking what crosses -----------------------------------------------------
class _LeafName:
  """``what`` and the path of leaf ``i`` of ``tree`` (e.g. ``x['ids']``),
  formatted only when an error message needs it: once per step call, the
  paths would cost more than the checks."""

  def __init__(self, what, tree, i):
    self.what, self.tree, self.i = what, tree, i

  def __str__(self):
    path = jax.tree_util.tree_flatten_with_path(self.tree)[0][self.i][0]
    return self.what + jax.tree_util.keystr(path)

  def __format__(self, spec):
    return format(str(self), spec)


def _check_tree(what, tree, specs, axis=None, length_range=None):
  """Checks ``tree`` against ``specs`` (a pytree of ShapeDtypeStructs); with
  ``axis``, the leaves have an extra axis there whose length must lie in
  ``length_range`` (inclusive). Returns ``(jax leaves, tree_def, length)``
  (length None without ``axis``)."""
  leaves, tree_def = jax.tree.flatten(tree)
  spec_leaves, spec_def = jax.tree.flatten(specs)
  if tree_def != spec_def:
    raise TypeError(f"{what}: expected the structure {spec_def}, got "
                    f"{tree_def}")
  out, lengths = [], set()
  for i, (x, spec) in enumerate(zip(leaves, spec_leaves)):
    name = _LeafName(what, tree, i)
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      raise TypeError(f"{name}: expected a torch.Tensor, got "
                      f"{type(x).__name__}")
    shape, want = tuple(x.shape), tuple(spec.shape)
    if axis is not None:
      if len(shape) != len(want) + 1:
        raise ValueError(f"{name}: expected {len(want) + 1} dimensions "
                         f"(one element has shape {want}, plus the time axis "
                         f"{axis}), got shape {shape}")
      a = axis % len(shape)
      lengths.add(shape[a])
      want = want[:a] + (shape[a],) + want[a:]
    if shape != want:
      raise ValueError(f"{name}: expected shape {want}, got {shape}")
    got_dtype = jax_dtype_of(x)
    if got_dtype != spec.dtype:
      # int64 -> int32 (and uint64 -> uint32) when JAX runs without x64, as
      # for any input to a jitted function: torch's default integer type.
      if not (jnp.issubdtype(got_dtype, jnp.integer) and
              jax.dtypes.canonicalize_dtype(got_dtype) == spec.dtype):
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got "
                        f"{got_dtype}")
    out.append(jit_argument(x, name) if isinstance(x, torch.Tensor) else
               jnp.asarray(x).astype(spec.dtype))
  if len(lengths) > 1:
    raise ValueError(f"{what}: the leaves have different lengths "
                     f"{sorted(lengths)} along the time axis {axis}")
  length = lengths.pop() if lengths else None
  if length_range is not None and length is not None:
    lo, hi = length_range
    if not lo <= length <= hi:
      raise ValueError(f"{what}: expected between {lo} and {hi} elements "
                       f"along the time axis {axis}, got {length}")
  return out, tree_def, length


def _element_spec(pair):
  """The spec (ShapeDtypeStructs) of one element ``x`` of the pair's input:
  ``adapters.haiku.StepPair`` and the loaded ``ExportedPair`` both have it."""
  spec = getattr(pair, "element_spec", None)
  if spec is None:
    raise TypeError(f"{type(pair).__name__} has no element_spec: TorchStepper "
                    "takes an adapters.haiku.StepPair (or a loaded export)")
  return spec


def _plain_tensor_spec(spec):
  """``(torch.Size, torch dtype)`` of an element that is one array of a
  dtype NumPy and torch share; None for pytrees and other dtypes."""
  if not isinstance(spec, jax.ShapeDtypeStruct):
    return None
  try:
    dtype = torch.from_numpy(np.empty(0, spec.dtype)).dtype
  except TypeError:
    return None
  return torch.Size(spec.shape), dtype


# -- TorchStepper --------------------------------------------------------------
class _Compiled:
  """The jitted init, prefill, step, run and extend of one pair; step, run
  and extend donate the carry (argument 1)."""

  def __init__(self, pair):
    axis = pair.axis
    try:      # a weak reference: the per-pair cache must not keep pairs alive
      pair_ref = weakref.ref(pair)
    except TypeError:
      pair_ref = lambda: pair  # noqa: E731

    def run(unscanned, carry, xs):
      pair = pair_ref()
      if isinstance(pair, ExportedPair):   # its exported run
        return pair.run(*unscanned, carry, xs)
      xs = jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), xs)
      carry, ys = lax.scan(lambda c, x: pair.step(*unscanned, c, x), carry,
                           xs)
      return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), ys)

    def prefill(unscanned, prompt, lengths):
      if lengths is None:                  # (an ExportedPair takes none)
        return pair_ref().prefill(*unscanned, prompt)
      return pair_ref().prefill(*unscanned, prompt, lengths=lengths)

    def extend(unscanned, carry, block, lengths):
      pair = pair_ref()
      if isinstance(pair, ExportedPair):   # steps, no rows
        return run(unscanned, carry, block)
      return pair.extend(*unscanned, carry, block, lengths=lengths)

    self.init = jax.jit(lambda u: pair_ref().init(*u))
    self.prefill = jax.jit(prefill)
    self.step = jax.jit(lambda u, carry, x: pair_ref().step(*u, carry, x),
                        donate_argnums=1)
    self.run = jax.jit(run, donate_argnums=1)
    self.extend = jax.jit(extend, donate_argnums=1)


def _compiled_for(pair):
  """One :class:`_Compiled` per pair, shared by its steppers."""
  try:
    compiled = _compiled_cache.get(pair)
  except TypeError:                      # not hashable or not weak-referable
    return _Compiled(pair)
  if compiled is None:
    compiled = _compiled_cache[pair] = _Compiled(pair)
  return compiled


_compiled_cache = weakref.WeakKeyDictionary()


def _on_one_device(x):
  """A parameter on one device: the step's outputs cross to PyTorch through
  DLPack, which takes one device's memory. A replicated array gives its
  first copy; one split over devices is refused."""
  sharding = getattr(x, "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return x
  if sharding.is_fully_replicated:
    return x.addressable_data(0)
  raise ValueError(
      f"TorchStepper: a parameter of shape {tuple(x.shape)} is spread over "
      f"{len(sharding.device_set)} devices, and DLPack hands PyTorch one "
      "device's memory: place the parameters on one device "
      "(jax.device_put(params, jax.devices()[0])), or step the pair from "
      "JAX (pair.step, pair.generate), which keeps them sharded")


class TorchStepper:
  """A derived step as a stateful PyTorch-side object.

  The carry (KV caches, recurrent states, the position) stays on the JAX side
  between calls and is donated to the next call, so it is updated in place;
  only ``x`` and ``y`` cross the boundary, without copies (see
  :mod:`adapters.torch`). The parameters (and Haiku state) are converted to
  JAX arrays once, here; torch tensors among them share memory with the JAX
  arrays.

  Args:
    pair: a ``StepPair`` (:func:`adapters.haiku.to_step`), or the object
      :func:`load_step` builds from an exported file.
    params: the model parameters (JAX arrays, NumPy arrays or torch tensors).
    state: the model state, for pairs of ``hk.transform_with_state`` models.

  Attributes:
    axis: the time axis of prompts, of ``run``'s inputs and of the outputs.
    batch_axis: the pair's axis of independent rows, or None (then
      ``lengths`` are refused). Loaded exports have None.
    length: L, the length of the example the pair was converted with.
    max_length: L when the state needs it (the most positions served), None
      when it does not (RNN carries, convolution queues: no limit).
    position: the number of elements seen since the last :meth:`reset` (with
      per-row ``lengths``, by the row that has seen most); ``positions``:
      per row, ``[B]`` ints with ``batch_axis``.
    carry: the current carry (JAX arrays; donated by the next call).

  Example:
    >>> import jax.numpy as jnp, torch
    >>> from adapters.haiku import to_step
    >>> pair = to_step(lambda w, xs: jnp.cumsum(xs @ w, axis=0),
    ...                jnp.ones((8, 2)), params=jnp.ones((2, 2)))
    >>> stepper = TorchStepper(pair, jnp.eye(2))
    >>> stepper.reset(torch.ones(3, 2)).tolist()
    [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    >>> stepper(torch.ones(2)).tolist()
    [4.0, 4.0]
    >>> stepper.extend(torch.ones(2, 2)).tolist()
    [[5.0, 5.0], [6.0, 6.0]]
  """

  def __init__(self, pair, params, state=None):
    self.pair = pair
    self.axis = pair.axis
    self.length = pair.length
    self.batch_axis = getattr(pair, "batch_axis", None)
    has_state = bool(getattr(pair, "has_state", False))
    if has_state and state is None:
      raise TypeError("this pair's model has state (hk.transform_with_state):"
                      " pass TorchStepper(pair, params, state)")
    if not has_state and state is not None:
      raise TypeError("this pair's model has no state: pass "
                      "TorchStepper(pair, params) without state")
    unscanned = (params, state) if has_state else (params,)
    self._unscanned = tuple(jax.tree.map(_on_one_device, tree_to_jax(u))
                            for u in unscanned)
    if hasattr(pair, "_ensure"):   # a pair that converts at its first call
      pair._ensure(self._unscanned, "TorchStepper")
    self.max_length = getattr(pair, "max_length", pair.length)
    self._limit = float("inf") if self.max_length is None else self.max_length
    self._element = _element_spec(pair)
    self._plain_x = _plain_tensor_spec(self._element)
    self._fns = _compiled_for(pair)
    self.carry = None
    self.position = 0
    self._lag = None      # per row: how far behind ``position`` (ragged)
    self.reset()

  @property
  def positions(self):
    """Elements seen per row: ``[B]`` ints (NumPy) with ``batch_axis``, else
    the int :attr:`position`."""
    if self.batch_axis is None:
      return self.position
    rows = self.pair._num_rows(self.pair.xs_spec)
    lag = 0 if self._lag is None else self._lag
    return np.full(rows, self.position, np.int64) - lag

  def reset(self, prompt=None, lengths=None):
    """Starts a new sequence, with a prompt or empty.

    Args:
      prompt: None, or a tensor (pytree) of P elements along ``axis``,
        0 <= P <= L.
      lengths: with a prompt and a pair with ``batch_axis``: ``[B]`` ints in
        [0, P] (a tensor, array or list); row b's prompt is its first
        ``lengths[b]`` elements, the rest padding.
    Returns:
      None without a prompt; with one, the outputs for the prompt (torch
      tensors, P elements along ``axis``; 0 at a row's padded positions).

    Example:
      >>> import jax.numpy as jnp, torch
      >>> from adapters.haiku import StepPair
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 1) * w, (1.0,),
      ...                 jnp.ones((2, 6)), axis=1, batch_axis=0)
      >>> stepper = TorchStepper(pair, 1.0)
      >>> stepper.reset(torch.ones(2, 3), lengths=torch.tensor([3, 1]))
      tensor([[1., 2., 3.],
              [1., 0., 0.]])
      >>> stepper.extend(torch.ones(2, 2), lengths=[1, 2]), stepper.positions
      (tensor([[4., 0.],
              [2., 3.]]), array([4, 3]))
    """
    if prompt is None:
      if lengths is not None:
        raise TypeError("reset: lengths needs a prompt")
      self.carry = self._fns.init(self._unscanned)
      self.position, self._lag = 0, None
      return None
    leaves, tree_def, p = _check_tree("prompt", prompt, self._element,
                                      self.axis, (0, self.length))
    prompt = jax.tree.unflatten(tree_def, leaves)
    lengths = self._lengths(lengths, prompt, "reset")
    self.carry, out = self._fns.prefill(self._unscanned, prompt, lengths)
    self.position, self._lag = 0, None
    self._advance(p, lengths)
    return jax.tree.map(to_torch, out)

  def extend(self, block, lengths=None):
    """Runs a block of k >= 1 elements at once, continuing the sequence
    (the next turn of a conversation, a chunk of a long prompt).

    Args:
      block: a tensor (pytree) of k elements along ``axis``.
      lengths: with a pair with ``batch_axis``: ``[B]`` ints in [0, k]; row
        b takes its first ``lengths[b]`` elements (0: it stays).
    Returns:
      The outputs for the block (torch tensors, k elements along ``axis``; 0
      at a row's padded positions), as k calls give them.
    """
    leaves, tree_def, k = _check_tree("block", block, self._element,
                                      self.axis, (1, float("inf")))
    block = jax.tree.unflatten(tree_def, leaves)
    lengths = self._lengths(lengths, block, "extend")
    end = self.positions + (k if lengths is None else np.asarray(lengths))
    if np.any(end > self._limit):
      raise ValueError(
          f"extend: this block would compute position "
          f"{int(np.max(end)) - 1}, but the step serves at most "
          f"L={self.max_length} positions (0 to {self.max_length - 1}): call "
          "reset(), or convert with a longer example")
    self.carry, ys = self._fns.extend(self._unscanned, self.carry, block,
                                      lengths)
    self._advance(k, lengths)
    return jax.tree.map(to_torch, ys)

  def _lengths(self, lengths, block, what):
    """``lengths`` checked against ``block`` as an int32 JAX array."""
    if lengths is None:
      return None
    if self.batch_axis is None:
      exported = (" (a loaded export takes no lengths)"
                  if isinstance(self.pair, ExportedPair) else "")
      raise TypeError(
          f"{what}: lengths (one per row) needs a pair with rows: convert the "
          f"model with to_step(..., batch_axis=...){exported}")
    if isinstance(lengths, torch.Tensor):
      lengths = lengths.detach().cpu().numpy()
    return self.pair._lengths(np.asarray(lengths), block, what)

  def _advance(self, k, lengths):
    self.position, self._lag = stepping.advanced(
        self.position, self.positions, k, lengths, self._lag)

  def __call__(self, x):
    """One step: ``x`` is one element (``axis`` removed); returns ``y``."""
    if self.position >= self._limit:
      raise ValueError(f"the step serves at most L={self.length} positions "
                       f"and {self.position} were used: call reset()")
    x_in = self._plain_x_view(x)
    if x_in is None:
      leaves, tree_def, _ = _check_tree("x", x, self._element)
      x_in = jax.tree.unflatten(tree_def, leaves)
    self.carry, y = self._fns.step(self._unscanned, self.carry, x_in)
    self.position += 1
    if isinstance(y, jax.Array):
      return torch.from_dlpack(y)
    return jax.tree.map(to_torch, y)

  def _plain_x_view(self, x):
    """The fast path of a step: when ``x`` is a CPU tensor with exactly the
    element's shape and dtype, its NumPy view, else None (the full checks).

    Why: right after a step, the caches hold the model's buffers, and the
    general checks cost 20-40 times what they cost hot (about 100 us for
    the benchmark transformer, 5% of its step).
    """
    if (self._plain_x is None or type(x) is not torch.Tensor
        or x.dtype != self._plain_x[1] or x.shape != self._plain_x[0]):
      return None
    try:   # refuses tensors that need grad, or on another device, or lazily
      return x.numpy()    # conjugated or negated; the full path serves them
    except (RuntimeError, TypeError):
      return None

  def run(self, xs):
    """Many steps in one dispatch (a compiled ``lax.scan``).

    Args:
      xs: N elements stacked along ``axis`` (N >= 1, position + N <= L when
        ``max_length`` is not None).
    Returns:
      The N outputs stacked along ``axis``: the same as N calls.
    """
    leaves, tree_def, n = _check_tree("xs", xs, self._element, self.axis,
                                      (1, self._limit - self.position))
    self.carry, ys = self._fns.run(self._unscanned, self.carry,
                                   jax.tree.unflatten(tree_def, leaves))
    self.position += n
    return jax.tree.map(to_torch, ys)


  def generate(self, prompt, steps, sample, rng=None, lengths=None,
               **options):
    """The pair's compiled generation loop (``StepPair.generate``), with
    torch tensors in and out; the stepper's carry and position are left as
    they are.

    Args:
      prompt: a tensor (pytree) of P >= 1 elements along ``axis``.
      steps: the number of elements to generate.
      sample: ``sample(rng, y) -> x``, a JAX function (it runs inside the
        compiled loop): the next element from the last output.
      rng: a JAX key or an int seed (default 0).
      lengths: with ``batch_axis``: ``[B]`` ints in [1, P], row b's prompt
        being its first ``lengths[b]`` elements.
      **options: the pair's other generation options (e.g. stop tokens).
    Returns:
      The generated elements, ``steps`` of them stacked along ``axis``.

    Example:
      >>> import jax.numpy as jnp, torch
      >>> from adapters.haiku import StepPair
      >>> pair = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
      ...                 jnp.ones((6,)))
      >>> TorchStepper(pair, 1.0).generate(torch.ones(2), 3, lambda k, y: y)
      tensor([2., 4., 8.])
    """
    if isinstance(self.pair, ExportedPair):
      raise TypeError(
          "generate: a loaded export has no generation loop (its sampling "
          "function is not in the file): call the stepper once per element "
          "and sample in torch, as examples/torch_pipeline.py does")
    leaves, tree_def, _ = _check_tree("prompt", prompt, self._element,
                                      self.axis, (0, self.length))
    if isinstance(lengths, torch.Tensor):
      lengths = lengths.detach().cpu().numpy()
    out = self.pair.generate(*self._unscanned,
                             jax.tree.unflatten(tree_def, leaves), steps,
                             sample, rng=rng, lengths=lengths, **options)
    return jax.tree.map(to_torch, out)
