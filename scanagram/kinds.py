"""What the conversion knows about each value in a jaxpr.

Every variable of the traced function gets a *kind*:

* ``UNSCANNED``: it does not depend on the scanned inputs (parameters,
  constants, masks, position tables). Prefill and step see the whole array.
* ``Scanned(axis, ahead)``: it is a sequence along ``axis``. Element ``i``
  depends only on inputs ``0 .. i - ahead``; ``ahead`` > 0 for a value shifted
  to the right (``pad`` at the front, ``concatenate([zeros, x[:-1]])``): it
  runs ``ahead`` elements ahead of the input. In prefill of a prompt of
  length P a scanned value holds its first ``P + ahead`` elements (at most its
  full length); in the step at position t it holds element ``t + ahead``,
  with ``axis`` kept at size 1.
* ``WHOLE_SEQUENCE``: known only at the end (a scan's final carry).
* ``History(axis, ...)``: see :mod:`scanagram.rules.attention`.
"""
import dataclasses
from typing import Any, Union


@dataclasses.dataclass(frozen=True)
class Unscanned:

  def __repr__(self):
    return "UNSCANNED"


UNSCANNED = Unscanned()


@dataclasses.dataclass(frozen=True)
class Scanned:
  axis: int
  ahead: int = 0

  def moved(self, axis: int) -> "Scanned":
    return Scanned(axis, self.ahead)


@dataclasses.dataclass(frozen=True)
class WholeSequence:
  """A value known only after the whole sequence (a scan's final carry).
  Any use of it is refused."""

  def __repr__(self):
    return "WHOLE_SEQUENCE"


WHOLE_SEQUENCE = WholeSequence()

Kind = Union[Unscanned, Scanned, Any]


def is_scanned(kind) -> bool:
  return isinstance(kind, Scanned)
