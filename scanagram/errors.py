"""The one error scanagram raises when a function cannot be converted."""
import os

from scanagram import _jax_internals


class ScanConversionError(Exception):
  """A function cannot be turned into a step: an operation is not causal along
  the scanned axis, or scanagram has no rule for it.

  The message names the primitive, says why, and gives the user's source line.
  """


def refusal(eqn, why: str, enclosing=()) -> ScanConversionError:
  """A ScanConversionError for ``eqn`` (a jaxpr equation) with reason ``why``.

  ``enclosing``: the call equations around ``eqn``, innermost last; the
  source line comes from the innermost one that has a user frame (an
  equation inside ``jnp.where``'s jit only knows JAX's own frames).
  """
  where = None
  for e in [eqn, *reversed(enclosing)]:
    where = user_source_line(e.source_info)
    if where is not None:
      break
  where = where or "<unknown location>"
  stack = _jax_internals.name_stack(eqn.source_info)
  module = f" in {stack}" if stack else ""
  return ScanConversionError(
      f"cannot convert `{eqn.primitive.name}` at {where}{module}: {why}")


def user_source_line(source_info):
  """``file:line (function)`` of the user's code that made an equation: the
  innermost frame outside installed packages (an ``hk.Linear`` makes its
  ``dot_general`` in Haiku's source, called from the user's model) and
  outside this project's library code, else the innermost non-JAX frame, or
  None."""
  frames = list(_jax_internals.user_frames(source_info))
  if not frames:
    return None
  file, line, function = next(
      (f for f in frames if not is_library_file(f[0])), frames[0])
  return f"{file}:{line} ({function})"


_LIBRARY_PATHS = [os.path.dirname(os.path.abspath(__file__)) + os.sep]


def register_library_path(path: str):
  """Files under ``path`` (an adapter) are library code, not the user's."""
  _LIBRARY_PATHS.append(path)


def is_library_file(path: str) -> bool:
  """Installed packages (Haiku, JAX, ...) and this project's library code."""
  parts = path.split(os.sep)
  return ("site-packages" in parts or "dist-packages" in parts or
          path.startswith(tuple(_LIBRARY_PATHS)))
