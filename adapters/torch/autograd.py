"""jax2torch: a JAX function as a PyTorch function, autograd included."""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ._dlpack import to_jax, to_torch


def _is_inexact(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.inexact)


def _is_dynamic(leaf) -> bool:
  return isinstance(leaf, (torch.Tensor, jax.Array, np.ndarray, np.generic))


def _leaf_to_jax(leaf, name):
  if isinstance(leaf, torch.Tensor):
    return to_jax(leaf, name)
  return jnp.asarray(leaf)


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

