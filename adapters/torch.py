"""PyTorch bridge: call JAX functions and derived steps from PyTorch.

Three things, all built on DLPack directly (``torch.from_dlpack`` and
``jax.dlpack.from_dlpack``), so tensors cross the boundary without copies:

* :func:`jax2torch` turns a JAX function into a PyTorch function, with
  autograd through ``jax.vjp``.
* :class:`TorchStepper` runs a derived step (a ``StepPair`` from
  :mod:`adapters.haiku`) from PyTorch code: the carry stays on the JAX side
  and is donated to the next call; only ``x`` and ``y`` cross.
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
* JAX -> torch is always zero-copy: the tensor views the JAX output buffer.
* A tensor on a device JAX does not have (e.g. CUDA with a CPU-only jaxlib,
  or ``meta``) is refused with a ValueError.
"""
import functools
import io
import json
import zipfile
from typing import Any, Callable, Optional, Sequence

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
