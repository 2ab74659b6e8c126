"""What the Flax and Equinox adapters share: where in the user's code an error
arose, the check of unscanned arguments against the model's, and this folder
registered as library code (so that refusals name the user's model, not the
adapter)."""
import os
import sysconfig
from typing import Optional

import jax

from scanagram import errors

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
  got_leaves, want_leaves = _by_path(got), _by_path(want)
  parts = [f"{what}{p} is missing" for p in want_leaves
           if p not in got_leaves]
  parts += [f"{what}{p} is not in the model's {what}" for p in got_leaves
            if p not in want_leaves]
  for p, x in got_leaves.items():
    s = want_leaves.get(p)
    if s is not None and (x.shape != s.shape or x.dtype != s.dtype):
      parts.append(f"{what}{p} is {x.dtype}{list(x.shape)}, the model's "
                   f"{s.dtype}{list(s.shape)}")
  if not parts and jax.tree.structure(got) != jax.tree.structure(want):
    parts = [f"{what} has structure {jax.tree.structure(got)}, the model's "
             f"{jax.tree.structure(want)}"]
  if parts:
    more = f" (and {len(parts) - 4} more)" if len(parts) > 4 else ""
    raise TypeError(f"{what} differs from the model's: "
                    f"{'; '.join(parts[:4])}{more}; {hint}")


def _by_path(tree):
  return {jax.tree_util.keystr(path): x for path, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


errors.register_library_path(os.path.dirname(os.path.abspath(__file__))
                             + os.sep)
