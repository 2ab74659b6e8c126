"""Tensors across the boundary: torch -> JAX and back, through DLPack."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

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


def jax_dtype_of(x):
  """The dtype of a torch tensor or an array, as a NumPy/JAX dtype."""
  if isinstance(x, torch.Tensor):
    return jnp.dtype(str(x.dtype).replace("torch.", ""))
  return jnp.dtype(x.dtype)


def _check_fits(t: torch.Tensor, name: str):
  """Refuses int64 (uint64) values that JAX, with ``jax_enable_x64`` off,
  would narrow to int32 (uint32) by wrapping them around silently (2**31
  would become -2**31)."""
  if t.dtype not in (torch.int64, torch.uint64):
    return
  dtype = jax_dtype_of(t)
  narrow = jax.dtypes.canonicalize_dtype(dtype)
  if narrow == dtype:
    return
  low, high = np.iinfo(narrow).min, np.iinfo(narrow).max
  if not t.numel():
    return
  # torch cannot compare uint64: as int64, values >= 2**63 are negative
  values = t if t.dtype == torch.int64 else t.view(torch.int64)
  smallest, largest = (v.item() for v in torch.aminmax(values))
  if smallest < low or largest > high:
    outside = (values < low) | (values > high)
    first = int(values[outside][0])
    if low == 0:             # uint64: back from its int64 view
      first %= 2 ** 64
    raise ValueError(
        f"{name}: {int(outside.sum())} of its {dtype.name} values lie "
        f"outside the {narrow.name} range [{low}, {high}] (e.g. {first}), "
        f"which JAX without jax_enable_x64 would wrap around: pass values "
        f"within that range")


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
  _check_fits(t, name)
  return t


def to_jax(t: torch.Tensor, name: str = "tensor") -> jax.Array:
  """A torch tensor as a JAX array, sharing its memory where DLPack allows.

  Non-contiguous tensors are made contiguous first (one copy); a tensor on a
  device JAX lacks raises ValueError, and so do int64 values outside int32
  when JAX runs without x64. ``requires_grad`` is dropped (the tensor is
  detached).
  """
  return jax.dlpack.from_dlpack(_plain(t, name))


def jit_argument(t: torch.Tensor, name: str):
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
  sharding = getattr(x, "sharding", None)
  devices = getattr(sharding, "device_set", ())
  if len(devices) > 1 and sharding.is_fully_replicated:
    x = x.addressable_data(0)   # every device holds all of it: take one
  elif len(devices) > 1:
    raise ValueError(
        f"a JAX array of shape {tuple(x.shape)} is spread over "
        f"{len(devices)} devices, and DLPack hands PyTorch one device's "
        "memory: run the pair on one device (give it parameters placed on "
        "one device, e.g. jax.device_put(params, jax.devices()[0])), or "
        "gather the array first (jax.device_get)")
  return torch.from_dlpack(x)


def tree_to_jax(tree):
  """Every leaf as a JAX array: torch tensors through DLPack, others with
  jnp.asarray (JAX arrays are kept as they are)."""
  return jax.tree.map(
      lambda x: to_jax(x, "parameter") if isinstance(x, torch.Tensor)
      else jnp.asarray(x), tree)
