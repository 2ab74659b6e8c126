"""What the conversion knows about each value in a jaxpr.

Every variable of the traced function gets a *kind*:

* ``UNSCANNED``: it does not depend on the scanned inputs (parameters,
  constants, masks, position tables). Every block sees the whole array.
* ``Scanned(axis, ahead)``: it is a sequence along ``axis``. Element ``i``
  depends only on inputs ``0 .. i - ahead``; ``ahead`` > 0 for a value shifted
  to the right (``pad`` at the front, ``concatenate([zeros, x[:-1]])``): it
  runs ``ahead`` elements ahead of the input. In a block of k elements from
  position t (:class:`scanagram.interpreter.Block`) it holds elements
  ``t + ahead .. t + ahead + k - 1``; in a fresh block (a prefill) its first
  ``k + ahead`` (at most its full length).
* ``WHOLE_SEQUENCE``: known only at the end (a scan's final carry).
* ``History(axis, key_axis, ahead, future)``: attention scores and what is
  computed from them: scanned along ``axis`` (rows, one per query position
  i) with a ``key_axis`` over all L positions of the sequence. In a block
  the keys come from a buffer whose unfilled part (positions after the
  newest element) differs from the training mode. ``future`` records what
  row i holds at the keys j > i: ``TAINTED`` (may differ from the training
  mode there), ``EXACT`` (equals the training mode, value unknown),
  ``NEG`` (equals it, and is a large negative number: a mask's fill minus a
  finite row maximum), ``LOW`` (large and negative in both modes, maybe not
  the same number: finite scores plus an additive mask's -1e9), or a float
  constant (equals it, and is that value).
  With ``window`` w the keys live in a ring of the last w positions and
  ``future`` covers the keys outside the window too (j > i or j <= i - w).
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

class _Marker(str):
  def __repr__(self):
    return str(self)


TAINTED = _Marker("TAINTED")
EXACT = _Marker("EXACT")
NEG = _Marker("NEG")
LOW = _Marker("LOW")


@dataclasses.dataclass(frozen=True)
class History:
  axis: int
  key_axis: int
  ahead: int = 0
  future: Any = TAINTED
  window: Any = None  # w: keys live in a ring of the last w positions
  origin: Any = None  # the q·kᵀ equation the scores come from

  def replace(self, **changes) -> "History":
    return dataclasses.replace(self, **changes)


Kind = Union[Unscanned, Scanned, Any]


def is_scanned(kind) -> bool:
  return isinstance(kind, Scanned)
