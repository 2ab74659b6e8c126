"""What the Flax and Equinox adapters share: where in the user's code an error
arose, the check of unscanned arguments against the model's, and this folder
registered as library code (so that refusals name the user's model, not the
adapter)."""
import os
import sysconfig
from typing import Optional

from scanagram import errors
from scanagram.stepping import leaf_differences

_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def user_line(error: BaseException) -> Optional[str]:
  """``file:line`` of the innermost frame of ``error``'s traceback that is the
  user's code (not an installed package, the standard library or
  scanagram), or None."""
  where, tb = None, error.__traceback__
  while tb is not None:
    file = tb.tb_frame.f_code.co_filename
    if not errors.is_library_file(file) and not file.startswith(_STDLIB):
      where = f"{file}:{tb.tb_lineno}"
    tb = tb.tb_next
  return where


def at(error: BaseException) -> str:
  """`` (at file:line)`` for :func:`user_line`, or nothing."""
  where = user_line(error)
  return f" (at {where})" if where else ""


def check_like(got, want, what: str, hint: str):
  """Raises a TypeError naming the leaves where ``got`` differs from
  ``want`` (ShapeDtypeStructs) in structure, shape or dtype; ``hint`` says
  what to pass instead."""
  differs = leaf_differences(got, want, what, "the model's", "the model's")
  if differs:
    raise TypeError(f"{what} differs from the model's: {differs}; {hint}")


errors.register_library_path(os.path.dirname(os.path.abspath(__file__))
                             + os.sep)
