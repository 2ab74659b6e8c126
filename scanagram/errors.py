"""The one error scanagram raises when a function cannot be converted."""
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
    where = _jax_internals.user_source_line(e.source_info)
    if where is not None:
      break
  where = where or "<unknown location>"
  stack = _jax_internals.name_stack(eqn.source_info)
  module = f" in {stack}" if stack else ""
  return ScanConversionError(
      f"cannot convert `{eqn.primitive.name}` at {where}{module}: {why}")
