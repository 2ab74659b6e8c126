"""export_step / load_step: :mod:`scanagram.export` from PyTorch."""
from typing import Optional, Sequence

from scanagram import export

from ._dlpack import tree_to_jax
from .stepper import TorchStepper


def export_step(pair, params, path, *, state=None, prompt_lengths=(),
                platforms: Optional[Sequence[str]] = None):
  """:func:`scanagram.export.save`, taking torch tensors among the
  parameters and state (see it for the file and the arguments).

  Returns:
    ``path``.
  """
  return export.save(pair, tree_to_jax(params), path,
                     state=None if state is None else tree_to_jax(state),
                     prompt_lengths=prompt_lengths, platforms=platforms)


def load_step(path) -> TorchStepper:
  """Loads an :func:`export_step` (or :func:`scanagram.export.save`) file as
  a :class:`TorchStepper`.

  Needs only JAX, NumPy and PyTorch: neither the model's code nor Haiku.
  The stepper's pair is a :class:`scanagram.export.ExportedPair`; ``reset``,
  ``__call__``, ``run`` and ``extend`` behave as on the stepper the file was
  exported from, except that ``reset(prompt)`` serves only the exported
  prompt lengths when the prefill was not exported with a symbolic length,
  and that there are no per-row ``lengths`` and no ``generate``.

  Raises:
    ValueError: the file is not a readable step file (see
      :func:`scanagram.export.load`).
  """
  pair = export.load(path)
  return TorchStepper(pair, pair.params)
