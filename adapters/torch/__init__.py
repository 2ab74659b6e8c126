"""PyTorch bridge: call JAX functions and derived steps from PyTorch.

Three things, all built on DLPack directly (``torch.from_dlpack`` and
``jax.dlpack.from_dlpack``), so tensors cross the boundary without copies:

* :func:`jax2torch` (``autograd.py``) turns a JAX function into a PyTorch
  function, with autograd through ``jax.vjp``.
* :class:`TorchStepper` (``stepper.py``) runs a derived step (a ``StepPair``
  from :mod:`adapters.haiku`) from PyTorch code: the carry stays on the JAX
  side and is donated to the next call; only ``x`` and ``y`` (and blocks of
  elements for ``extend`` and ``run``) cross.
* :func:`export_step` / :func:`load_step` (``export.py``) are
  :func:`scanagram.export.save` / :func:`scanagram.export.load` with torch
  tensors as parameters and a :class:`TorchStepper` as the loaded step.

The package ``jax2torch`` (0.0.7) is not a dependency: it no longer works on
current JAX (``jax.dlpack.to_dlpack`` was removed and
``jax.dlpack.from_dlpack`` takes an array, not a capsule).

How tensors cross (``_dlpack.py``; the same rules everywhere):

* torch -> JAX is zero-copy for contiguous tensors whose data pointer JAX
  accepts. Non-contiguous tensors (transposes, slices with steps, expanded
  tensors, such as the gradients ``sum().backward()`` passes on) are first made
  contiguous with ``.contiguous()``: one copy. JAX on CPU also copies a tensor
  whose data is not 16-byte aligned (e.g. ``t[1:]`` of a float32 tensor).
  With ``jax_enable_x64`` off, int64 and float64 tensors are converted by JAX
  to int32 and float32 (a copy), as JAX does for any 64-bit input; int64
  values outside the int32 range are refused with a ValueError rather than
  wrapped around.
* Inside TorchStepper, CPU tensors enter the jitted calls as NumPy views,
  which JAX imports zero-copy as well (when aligned) and which make the step
  run faster than a DLPack import just before it.
* JAX -> torch is always zero-copy: the tensor views the JAX output buffer.
* A tensor on a device JAX does not have (e.g. CUDA with a CPU-only jaxlib,
  or ``meta``) is refused with a ValueError.
"""
from scanagram.export import ExportedPair

from ._dlpack import to_jax, to_torch
from .autograd import jax2torch
from .export import export_step, load_step
from .stepper import TorchStepper

__all__ = ["jax2torch", "to_jax", "to_torch", "TorchStepper",
           "export_step", "load_step", "ExportedPair"]
