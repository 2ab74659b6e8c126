"""PyTorch bridge: call JAX functions and derived steps from PyTorch.

Three things, all built on DLPack directly (``torch.from_dlpack`` and
``jax.dlpack.from_dlpack``), so tensors cross the boundary without copies:

* :func:`jax2torch` turns a JAX function into a PyTorch function, with
  autograd through ``jax.vjp``.
* :class:`TorchStepper` runs a derived step (a ``StepPair`` from
  :mod:`adapters.haiku`) from PyTorch code: the carry stays on the JAX side
  and is donated to the next call; only ``x`` and ``y`` (and blocks of
  elements for ``extend`` and ``run``) cross.
* :func:`export_step` / :func:`load_step` write a step, its prefills and its
  parameters to one file with ``jax.export``, to load where neither the
  model's code nor Haiku is importable.

The package ``jax2torch`` (0.0.7) is not a dependency: it no longer works on
current JAX (``jax.dlpack.to_dlpack`` was removed and
``jax.dlpack.from_dlpack`` takes an array, not a capsule).

How tensors cross (the same rules everywhere in this module):

* torch -> JAX is zero-copy for contiguous tensors whose data pointer JAX
  accepts. Non-contiguous tensors (transposes, slices with steps, expanded
  tensors, such as the gradients ``sum().backward()`` passes on) are first made
  contiguous with ``.contiguous()``: one copy. JAX on CPU also copies a tensor
  whose data is not 16-byte aligned (e.g. ``t[1:]`` of a float32 tensor).
  With ``jax_enable_x64`` off, int64 and float64 tensors are converted by JAX
  to int32 and float32 (a copy), as JAX does for any 64-bit input.
* Inside TorchStepper, CPU tensors enter the jitted calls as NumPy views,
  which JAX imports zero-copy as well (when aligned) and which make the step
  run faster than a DLPack import just before it.
* JAX -> torch is always zero-copy: the tensor views the JAX output buffer.
* A tensor on a device JAX does not have (e.g. CUDA with a CPU-only jaxlib,
  or ``meta``) is refused with a ValueError.
"""
import functools
import json
import weakref
import zipfile
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

__all__ = ["jax2torch", "to_jax", "to_torch", "TorchStepper",
           "export_step", "load_step"]


# -- crossing the boundary -----------------------------------------------------
_TORCH_TO_JAX_PLATFORM = {"cpu": "cpu", "cuda": "gpu", "hip": "gpu"}


@functools.lru_cache(maxsize=None)
def _jax_has_platform(platform: str) -> bool:
  try:
    return bool(jax.devices(platform))
  except RuntimeError:
    return False


def _check_device(t: torch.Tensor, name: str = "tensor"):
  platform = _TORCH_TO_JAX_PLATFORM.get(t.device.type)
  if platform is None or not _jax_has_platform(platform):
    raise ValueError(
        f"{name} is on torch device {t.device}, which JAX does not have "
        f"(JAX devices: {jax.devices()}); move it there first, e.g. "
        f"tensor.to('{jax.devices()[0].platform.replace('gpu', 'cuda')}')")


def to_jax(t: torch.Tensor, name: str = "tensor") -> jax.Array:
  """A torch tensor as a JAX array, sharing its memory where DLPack allows.

  Non-contiguous tensors are made contiguous first (one copy); a tensor on a
  device JAX lacks raises ValueError. ``requires_grad`` is dropped (the
  tensor is detached).
  """
  return jax.dlpack.from_dlpack(_plain(t, name))


def _plain(t: torch.Tensor, name: str) -> torch.Tensor:
  """``t`` detached, contiguous, without lazy conjugation or negation: what
  DLPack can export. Checks that JAX has ``t``'s device."""
  if not isinstance(t, torch.Tensor):
    raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
  _check_device(t, name)
  t = t.detach()
  if t.is_conj():
    t = t.resolve_conj()
  if t.is_neg():
    t = t.resolve_neg()
  if not t.is_contiguous():
    t = t.contiguous()
  return t


def _jit_argument(t: torch.Tensor, name: str):
  """``t`` as an argument of a jitted call, sharing its memory.

  A CPU tensor goes in as a NumPy view, which jit imports without a copy as
  it does a DLPack array; but a step given an array that
  ``jax.dlpack.from_dlpack`` made just before it ran 15% slower than one
  given a JAX array already there, and one given the NumPy view 2% slower
  (call-by-call A/B with the transformer of ``benchmarks/run.py``). Tensors
  NumPy cannot view (bfloat16, other devices) go through DLPack.
  """
  t = _plain(t, name)
  if t.device.type == "cpu":
    try:
      return t.numpy()
    except TypeError:      # a dtype NumPy lacks, e.g. bfloat16
      pass
  return jax.dlpack.from_dlpack(t)


def to_torch(x) -> torch.Tensor:
  """A JAX array as a torch tensor sharing its memory (zero-copy)."""
  return torch.from_dlpack(x)


def _is_inexact(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def _is_dynamic(leaf) -> bool:
  return isinstance(leaf, (torch.Tensor, jax.Array, np.ndarray, np.generic))


def _leaf_to_jax(leaf, name):
  if isinstance(leaf, torch.Tensor):
    return to_jax(leaf, name)
  return jnp.asarray(leaf)


# -- jax2torch -----------------------------------------------------------------
class _Traced:
  """``fn`` for one input structure: its jitted forward and forward-with-VJP
  (one per set of differentiated inputs); jax.jit keeps one executable per
  shape/dtype signature."""

  def __init__(self, fn, treedef, static):
    self.fn, self.treedef, self.static = fn, treedef, static
    self.out_info = {}       # input signature -> (out treedef, inexact mask)
    self.forward = jax.jit(self._call)
    self._with_vjp = {}
    self.backward = jax.jit(lambda vjp_fn, cts: vjp_fn(cts))

  def _call(self, *dynamic):
    it = iter(dynamic)
    leaves = [next(it) if s is _DYNAMIC else s for s in self.static]
    args, kwargs = jax.tree.unflatten(self.treedef, leaves)
    out = self.fn(*args, **kwargs)
    out_leaves, out_tree = jax.tree.flatten(out)
    out_leaves = [jnp.asarray(y) for y in out_leaves]
    self.out_info[_signature(dynamic)] = (
        out_tree, tuple(_is_inexact(y.dtype) for y in out_leaves))
    return out_leaves

  def with_vjp(self, mask):
    """Jitted ``dynamic -> (inexact outputs, other outputs, vjp_fn)``, the
    VJP taken with respect to the inputs where ``mask`` is True."""
    if mask not in self._with_vjp:
      def fwd(*dynamic):
        def split(*diff):
          it = iter(diff)
          full = [next(it) if m else d for d, m in zip(dynamic, mask)]
          outs = self._call(*full)
          return ([y for y in outs if _is_inexact(y.dtype)],
                  [y for y in outs if not _is_inexact(y.dtype)])
        diff = [d for d, m in zip(dynamic, mask) if m]
        inexact, vjp_fn, other = jax.vjp(split, *diff, has_aux=True)
        return inexact, other, vjp_fn
      self._with_vjp[mask] = jax.jit(fwd)
    return self._with_vjp[mask]


_DYNAMIC = object()


def _signature(arrays):
  return tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in arrays)


def _interleave(inexact, other, mask):
  a, b = iter(inexact), iter(other)
  return [next(a) if m else next(b) for m in mask]


class _JaxFunction(torch.autograd.Function):
  """The autograd node of a :func:`jax2torch` call with gradients."""

  @staticmethod
  def forward(ctx, traced, mask, holder, *dynamic):
    xs = [_leaf_to_jax(d, f"argument leaf {i}") for i, d in enumerate(dynamic)]
    inexact, other, vjp_fn = traced.with_vjp(mask)(*xs)
    out_tree, out_mask = traced.out_info[_signature(xs)]
    holder.append(out_tree)
    outs = [to_torch(y) for y in _interleave(inexact, other, out_mask)]
    ctx.traced, ctx.mask, ctx.vjp_fn, ctx.out_mask = (
        traced, mask, vjp_fn, out_mask)
    ctx.out_specs = [jax.ShapeDtypeStruct(y.shape, y.dtype) for y in inexact]
    ctx.mark_non_differentiable(*[t for t, m in zip(outs, out_mask)
                                  if not m])
    return tuple(outs)

  @staticmethod
  @torch.autograd.function.once_differentiable
  def backward(ctx, *grads):
    cts = []
    for g, spec in zip([g for g, m in zip(grads, ctx.out_mask) if m],
                       ctx.out_specs):
      ct = (jnp.zeros(spec.shape, spec.dtype) if g is None
            else to_jax(g, "gradient"))
      cts.append(ct if ct.dtype == spec.dtype else ct.astype(spec.dtype))
    in_grads = iter(ctx.traced.backward(ctx.vjp_fn, cts))
    return (None, None, None) + tuple(
        to_torch(next(in_grads)) if m else None for m in ctx.mask)


def jax2torch(fn: Callable) -> Callable:
  """A JAX function as a PyTorch function (decorator), autograd included.

  The wrapped function takes torch tensors (and pytrees of them: tuples,
  lists, dicts) where ``fn`` takes arrays, and returns ``fn``'s outputs as
  torch tensors in the same structure. Tensors cross through DLPack without
  copies (see the module docstring for the exceptions: non-contiguous tensors
  are made contiguous). ``fn`` is jitted once per input structure and
  signature; leaves that are not arrays or tensors (Python numbers, strings)
  are static arguments, part of that signature.

  Gradients: when grad mode is on and some floating input requires grad,
  the call records an autograd node whose backward is ``jax.vjp`` of ``fn``
  (jitted forward and backward; the residuals stay on the JAX side).
  Integer and boolean inputs get no gradient (None), integer outputs are
  non-differentiable. Otherwise (``torch.no_grad()`` or no input requiring
  grad) the call is a plain jitted forward without the VJP. Backward is
  once-differentiable.

  Args:
    fn: a JAX function of arrays (pytrees allowed, keyword arguments too).

  Returns:
    The PyTorch function.

  Example:
    >>> import torch, jax.numpy as jnp
    >>> @jax2torch
    ... def f(x, w):
    ...   return jnp.sin(x) @ w
    >>> x = torch.zeros(2, 3, requires_grad=True)
    >>> y = f(x, torch.ones(3, 4))
    >>> y.sum().backward()
    >>> x.grad.tolist()
    [[4.0, 4.0, 4.0], [4.0, 4.0, 4.0]]
  """
  cache = {}

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    static = tuple(_DYNAMIC if _is_dynamic(x) else x for x in leaves)
    try:
      key = (treedef, static)
      traced = cache.get(key)
    except TypeError as e:
      raise TypeError(
          f"{fn.__name__}: the non-array arguments "
          f"{[x for x in static if x is not _DYNAMIC]} must be hashable: they "
          f"are static arguments of the jitted function") from e
    if traced is None:
      traced = cache[key] = _Traced(fn, treedef, static)
    dynamic = [x for x in leaves if _is_dynamic(x)]
    mask = tuple(isinstance(x, torch.Tensor) and x.requires_grad and
                 _torch_is_inexact(x.dtype) for x in dynamic)
    if torch.is_grad_enabled() and any(mask):
      holder = []
      outs = _JaxFunction.apply(traced, mask, holder, *dynamic)
      return jax.tree.unflatten(holder[0], list(outs))
    xs = [_leaf_to_jax(d, f"argument leaf {i}") for i, d in enumerate(dynamic)]
    outs = traced.forward(*xs)
    out_tree, _ = traced.out_info[_signature(xs)]
    return jax.tree.unflatten(out_tree, [to_torch(y) for y in outs])

  wrapper.jitted_structures = cache
  return wrapper


def _torch_is_inexact(dtype: torch.dtype) -> bool:
  return dtype.is_floating_point or dtype.is_complex


# -- checking what crosses -----------------------------------------------------
def _jax_dtype_of(x):
  if isinstance(x, torch.Tensor):
    return jnp.dtype(str(x.dtype).replace("torch.", ""))
  return jnp.dtype(x.dtype)


def _tree_to_jax(tree):
  """Every leaf as a JAX array: torch tensors through DLPack, others with
  jnp.asarray (JAX arrays are kept as they are)."""
  return jax.tree.map(
      lambda x: to_jax(x, "parameter") if isinstance(x, torch.Tensor)
      else jnp.asarray(x), tree)


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
  ``length_range`` (inclusive). Returns ``(jax leaves, length)``."""
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
    got_dtype = _jax_dtype_of(x)
    if got_dtype != spec.dtype:
      # int64 -> int32 (and uint64 -> uint32) when JAX runs without x64, as
      # for any input to a jitted function: torch's default integer type.
      if not (jnp.issubdtype(got_dtype, jnp.integer) and
              jax.dtypes.canonicalize_dtype(got_dtype) == spec.dtype):
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got "
                        f"{got_dtype}")
    out.append(_jit_argument(x, name) if isinstance(x, torch.Tensor) else
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
      if hasattr(pair, "_run"):            # an ExportedPair: its exported run
        return pair._run(*unscanned, carry, xs)
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
      if not hasattr(pair, "extend"):      # an ExportedPair: steps, no rows
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


class TorchStepper:
  """A derived step as a stateful PyTorch-side object.

  The carry (KV caches, recurrent states, the position) stays on the JAX side
  between calls and is donated to the next call, so it is updated in place;
  only ``x`` and ``y`` cross the boundary, without copies (see the module
  docstring). The parameters (and Haiku state) are converted to JAX arrays
  once, here; torch tensors among them share memory with the JAX arrays.

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
    self.max_length = getattr(pair, "max_length", pair.length)
    self._limit = float("inf") if self.max_length is None else self.max_length
    has_state = bool(getattr(pair, "has_state", False))
    if has_state and state is None:
      raise TypeError("this pair's model has state (hk.transform_with_state):"
                      " pass TorchStepper(pair, params, state)")
    if not has_state and state is not None:
      raise TypeError("this pair's model has no state: pass "
                      "TorchStepper(pair, params) without state")
    unscanned = (params, state) if has_state else (params,)
    self._unscanned = tuple(_tree_to_jax(u) for u in unscanned)
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
      exported = ("" if hasattr(self.pair, "extend") else
                  " (a loaded export takes no lengths)")
      raise TypeError(
          f"{what}: lengths (one per row) needs a pair with rows: convert the "
          f"model with to_step(..., batch_axis=...){exported}")
    if isinstance(lengths, torch.Tensor):
      lengths = lengths.detach().cpu().numpy()
    return self.pair._lengths(np.asarray(lengths), block, what)

  def _advance(self, k, lengths):
    if lengths is None:
      self.position += int(k)
      return
    positions = self.positions + np.asarray(lengths)
    self.position = int(np.max(positions, initial=0))
    self._lag = self.position - positions

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


# -- export_step / load_step ---------------------------------------------------
_FORMAT = "scanagram-step"
_VERSION = 1


def _skeleton(tree_def):
  """A JSON description of a pytree structure of dicts, lists, tuples and
  None (the containers jax.export cannot serialize with non-string keys)."""
  def encode(node):
    if node is None:
      return {"none": True}
    if isinstance(node, dict):
      return {"dict": [[_encode_key(k), encode(v)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)) and type(node) in (list, tuple):
      return {type(node).__name__: [encode(v) for v in node]}
    if node is _LEAF:
      return {"leaf": True}
    raise TypeError(f"export_step supports inputs and outputs made of dicts, "
                    f"lists, tuples and arrays; got a {type(node).__name__} "
                    f"node in {tree_def}")
  marked = jax.tree.unflatten(tree_def, [_LEAF] * tree_def.num_leaves)
  return encode(marked)


_LEAF = object()


def _encode_key(k):
  if isinstance(k, bool) or not isinstance(k, (str, int)):
    raise TypeError(f"export_step supports dict keys that are str or int; got "
                    f"{k!r}")
  return {"str": k} if isinstance(k, str) else {"int": k}


def _structure(skeleton):
  def decode(node):
    if "none" in node:
      return None
    if "leaf" in node:
      return 0
    if "dict" in node:
      return {(k["str"] if "str" in k else k["int"]): decode(v)
              for k, v in node["dict"]}
    if "list" in node:
      return [decode(v) for v in node["list"]]
    return tuple(decode(v) for v in node["tuple"])
  return jax.tree.structure(decode(skeleton))


def _spec_json(spec):
  return {"shape": [int(d) for d in spec.shape], "dtype": jnp.dtype(
      spec.dtype).name}


def _spec_from_json(d):
  return jax.ShapeDtypeStruct(tuple(d["shape"]), jnp.dtype(d["dtype"]))


def _with_time(spec, axis, n):
  shape = list(spec.shape)
  a = axis % (len(shape) + 1)
  shape.insert(a, n)
  return jax.ShapeDtypeStruct(tuple(shape), spec.dtype)


def export_step(pair, params, path, *, state=None, prompt_lengths=(),
                platforms: Optional[Sequence[str]] = None):
  """Writes a pair's init, step, run and prefills to one file.

  The file is a zip holding ``meta.json`` (axis, L, structures and specs),
  the parameters (and state) as raw arrays beside the functions (they stay
  inputs of the exported functions, not constants: ``params/<i>.bin``), and
  ``jax.export`` serializations (``Exported.serialize()``) of

  * ``init(params) -> carry``,
  * ``step(params, carry, x) -> (carry, y)``,
  * ``run(params, carry, xs) -> (carry, ys)`` with a symbolic number of steps
    ``n`` along ``axis``,
  * ``prefill(params, prompt) -> (carry, out)``: one with a symbolic prompt
    length ``p`` (1 <= p <= L) when the pair's prefill is shape-polymorphic,
    otherwise one per length in ``prompt_lengths``. The scanagram core is
    not shape-polymorphic for most models today (its rules compare the prompt
    length with L in Python), so expect the list; ``meta.json["prefill"]``
    says which was written. A prompt of length 0 is served by ``init``.

  Functions take and return flat lists of arrays (the carry is opaque to the
  loader); the structures of ``x`` and ``y`` are stored in ``meta.json``.

  Args:
    pair: a ``StepPair`` (:func:`adapters.haiku.to_step`).
    params: its parameters; ``state``: its model state, if it has one.
    path: the file to write.
    prompt_lengths: the prompt lengths to serve when the prefill cannot be
      exported with a symbolic length.
    platforms: ``jax.export`` lowering platforms (default: JAX's default
      backend), e.g. ``("cpu", "cuda")``.

  Returns:
    ``path``.
  """
  has_state = bool(getattr(pair, "has_state", False))
  unscanned = (params, state) if has_state else (params,)
  if has_state and state is None:
    raise TypeError("this pair's model has state: pass state=")
  u_leaves, u_def = jax.tree.flatten(tuple(_tree_to_jax(u) for u in
                                           unscanned))
  element = _element_spec(pair)
  x_leaves, x_def = jax.tree.flatten(element)
  axis, length = pair.axis, int(pair.length)
  kwargs = {} if platforms is None else {"platforms": tuple(platforms)}

  def unpack(u):
    return jax.tree.unflatten(u_def, u)

  def init(u):
    return jax.tree.leaves(pair.init(*unpack(u)))

  carry_spec = jax.eval_shape(lambda u: pair.init(*unpack(u)), u_leaves)
  carry_def = jax.tree.structure(carry_spec)

  def step(u, c, x):
    carry, y = pair.step(*unpack(u), jax.tree.unflatten(carry_def, c),
                         jax.tree.unflatten(x_def, x))
    return jax.tree.leaves(carry), jax.tree.leaves(y)

  def run(u, c, xs):
    xs = [jnp.moveaxis(x, axis, 0) for x in xs]
    c, ys = lax.scan(lambda c, x: step(u, c, x), c, xs)
    return c, [jnp.moveaxis(y, 0, axis) for y in ys]

  def prefill(u, prompt):
    carry, out = pair.prefill(*unpack(u), jax.tree.unflatten(x_def, prompt))
    return jax.tree.leaves(carry), jax.tree.leaves(out)

  u_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in u_leaves]
  c_specs = jax.tree.leaves(carry_spec)
  y_def = jax.tree.structure(jax.eval_shape(
      lambda u, c, x: pair.step(*unpack(u), jax.tree.unflatten(carry_def, c),
                                jax.tree.unflatten(x_def, x))[1],
      u_specs, c_specs, x_leaves))
  exported = {}
  exported["init"] = jax.export.export(jax.jit(init), **kwargs)(u_specs)
  exported["step"] = jax.export.export(jax.jit(step), **kwargs)(
      u_specs, c_specs, x_leaves)
  n, = jax.export.symbolic_shape("n")
  exported["run"] = jax.export.export(jax.jit(run), **kwargs)(
      u_specs, c_specs, [_with_time(s, axis, n) for s in x_leaves])
  p, = jax.export.symbolic_shape("p", constraints=(f"p <= {length}",))
  prefill_info = {"symbolic": False, "lengths": []}
  try:
    exported["prefill"] = jax.export.export(jax.jit(prefill), **kwargs)(
        u_specs, [_with_time(s, axis, p) for s in x_leaves])
    prefill_info["symbolic"] = True
  except Exception as e:  # noqa: BLE001  (any failure to be polymorphic)
    prefill_info["why_not_symbolic"] = f"{type(e).__name__}: {e}"[:2000]
    for length_p in sorted(set(int(q) for q in prompt_lengths)):
      if not 0 < length_p <= length:
        if length_p == 0:
          continue                      # served by init
        raise ValueError(f"prompt_lengths: {length_p} is not in 0..L="
                         f"{length}")
      exported[f"prefill_{length_p}"] = jax.export.export(
          jax.jit(prefill), **kwargs)(
              u_specs, [_with_time(s, axis, length_p) for s in x_leaves])
      prefill_info["lengths"].append(length_p)
  # A prompt of length 0 gives outputs of length 0: their specs.
  out_specs = jax.eval_shape(
      lambda u, pr: pair.prefill(*unpack(u), jax.tree.unflatten(x_def, pr))[1],
      u_specs, [_with_time(s, axis, 1) for s in x_leaves])
  out_leaves, out_def = jax.tree.flatten(out_specs)
  meta = {
      "format": _FORMAT, "version": _VERSION, "axis": axis,
      "length": length, "x_tree": _skeleton(x_def),
      "x_specs": [_spec_json(s) for s in x_leaves],
      "y_tree": _skeleton(y_def), "out_tree": _skeleton(out_def),
      "out_specs_at_1": [_spec_json(s) for s in out_leaves],
      "params": [_spec_json(s) for s in u_specs],
      "max_length": getattr(pair, "max_length", length),
      "prefill": prefill_info,
      "functions": sorted(exported),
  }
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("meta.json", json.dumps(meta, indent=1))
    for name, exp in exported.items():
      z.writestr(f"{name}.jax", bytes(exp.serialize()))
    for i, x in enumerate(u_leaves):
      z.writestr(f"params/{i}.bin", np.asarray(x).tobytes())
  return path


class ExportedPair:
  """A step pair read from an :func:`export_step` file: the interface
  :class:`TorchStepper` needs (``axis``, ``length``, ``max_length``,
  ``init``, ``prefill``, ``step``, ``carry_spec``), over deserialized ``jax.export`` functions.
  Its unscanned argument is the flat list of parameter (and state) arrays;
  its carry is a flat list of arrays.

  Attributes:
    params: the parameter arrays stored in the file.
    prefill_lengths: the prompt lengths the file serves: ``None`` for every
      length 0..L (symbolic export), else the exported ones and 0.
  """

  has_state = False

  def __init__(self, path):
    with zipfile.ZipFile(path) as z:
      meta = json.loads(z.read("meta.json"))
      if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"{path} is not a scanagram step file of version "
                         f"{_VERSION} (meta: {meta.get('format')!r} "
                         f"{meta.get('version')!r})")
      self._fns = {name: jax.export.deserialize(
          bytearray(z.read(f"{name}.jax"))) for name in meta["functions"]}
      self.params = [
          jnp.asarray(np.frombuffer(z.read(f"params/{i}.bin"),
                                    jnp.dtype(s["dtype"])).reshape(s["shape"]))
          for i, s in enumerate(meta["params"])]
    self.meta = meta
    self.axis = meta["axis"]
    self.length = meta["length"]
    self.max_length = meta.get("max_length", self.length)
    self._x_def = _structure(meta["x_tree"])
    self._y_def = _structure(meta["y_tree"])
    self._out_def = _structure(meta["out_tree"])
    self.element_spec = jax.tree.unflatten(
        self._x_def, [_spec_from_json(s) for s in meta["x_specs"]])
    info = meta["prefill"]
    self.prefill_lengths = (None if info["symbolic"]
                            else [0] + list(info["lengths"]))

  def carry_spec(self):
    return list(self._fns["init"].out_avals)

  def init(self, params):
    return self._fns["init"].call(params)

  def step(self, params, carry, x):
    carry, y = self._fns["step"].call(params, carry,
                                      self._x_def.flatten_up_to(x))
    return carry, jax.tree.unflatten(self._y_def, y)

  def _run(self, params, carry, xs):
    carry, ys = self._fns["run"].call(params, carry,
                                      self._x_def.flatten_up_to(xs))
    return carry, jax.tree.unflatten(self._y_def, ys)

  def prefill(self, params, prompt):
    leaves = self._x_def.flatten_up_to(prompt)
    p = leaves[0].shape[self.axis % leaves[0].ndim]
    if p == 0:
      outs = []
      for s in self.meta["out_specs_at_1"]:
        shape = list(s["shape"])
        shape[self.axis % len(shape)] = 0
        outs.append(jnp.zeros(shape, s["dtype"]))
      return self.init(params), jax.tree.unflatten(self._out_def, outs)
    name = "prefill" if self.prefill_lengths is None else f"prefill_{p}"
    if name not in self._fns:
      raise ValueError(
          f"this exported step has prefills for prompt lengths "
          f"{self.prefill_lengths} only, got a prompt of length {p}: export "
          f"it with prompt_lengths=(..., {p}) (the prefill could not be "
          f"exported with a symbolic length: "
          f"{self.meta['prefill'].get('why_not_symbolic', '')[:200]})")
    carry, out = self._fns[name].call(params, leaves)
    return carry, jax.tree.unflatten(self._out_def, out)


def load_step(path) -> TorchStepper:
  """Loads an :func:`export_step` file as a :class:`TorchStepper`.

  Needs only JAX, NumPy and PyTorch: neither the model's code nor Haiku.
  The stepper's pair is an :class:`ExportedPair`; ``reset``, ``__call__``
  and ``run`` behave as on the stepper the file was exported from, except
  that ``reset(prompt)`` serves only the exported prompt lengths when the
  prefill was not exported with a symbolic length.
  """
  pair = ExportedPair(path)
  return TorchStepper(pair, pair.params)
