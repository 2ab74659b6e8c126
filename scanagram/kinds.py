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
  newest element) differs from the training mode. ``future`` (a
  :class:`Future`) records what row i holds at the keys j > i, in the step
  compared with the training mode: ``TAINTED`` (nothing known),
  ``TAINTED_FINITE`` (may differ, finite in both modes: q·kᵀ against a
  zero-filled buffer), ``EXACT`` (equals the training mode, value unknown),
  ``NEG`` (equals it, and is below ``NEG_THRESHOLD``: a mask's fill minus a
  finite row maximum), ``LOW`` (below the threshold in both modes, maybe not
  the same number: finite scores plus an additive mask's -1e9) or
  ``Future.constant(c)`` (equals it, and is c).
  With ``window`` w the keys live in a ring of the last w positions and
  ``future`` covers the keys outside the window too (j > i or j <= i - w).
"""
import dataclasses
import math
from typing import Any, Optional, Union


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

# masked logits are filled below this, so exp of them minus a row maximum
# underflows to exactly 0 (see scanagram.rules.attention)
NEG_THRESHOLD = -1e4


@dataclasses.dataclass(frozen=True)
class Future:
  """What a row of scores holds at its future keys, in the step compared
  with the training mode. Each field is a fact at every future key:

  * ``exact``: the step holds what the training mode holds;
  * ``value``: that one number (only when exact and known);
  * ``below``: at most ``NEG_THRESHOLD`` in both modes (not the same
    number in both when not exact);
  * ``finite``: finite in both modes.
  """
  exact: bool = False
  value: Optional[float] = None
  below: bool = False
  finite: bool = False

  @staticmethod
  def constant(c) -> "Future":
    """Exactly the number ``c``: below the threshold, it counts as NEG
    does in every rule, and still computes as the number."""
    c = float(c)
    return Future(True, c, c <= NEG_THRESHOLD, math.isfinite(c))

  @property
  def tainted(self) -> bool:
    """May differ, unbounded by a mask (TAINTED, TAINTED_FINITE)."""
    return not (self.exact or self.below)

  @property
  def zero(self) -> bool:
    """Exactly 0 (attention weights that ignore the future keys)."""
    return self.value == 0.0

  def __str__(self):
    if self.value is not None:
      return str(self.value)
    return _NAMES.get(self) or ", ".join(
        f"{name}={value}" for name, value in dataclasses.asdict(self).items())

  def __repr__(self):
    return f"Future({self})"


TAINTED = Future()
TAINTED_FINITE = Future(finite=True)
EXACT = Future(exact=True)
# no `finite`: a fill or an additive mask may be -inf
NEG = Future(exact=True, below=True)
LOW = Future(below=True)
_NAMES = {TAINTED: "TAINTED", TAINTED_FINITE: "TAINTED_FINITE",
          EXACT: "EXACT", NEG: "NEG", LOW: "LOW"}


@dataclasses.dataclass(frozen=True)
class History:
  axis: int
  key_axis: int
  ahead: int = 0
  future: Future = TAINTED
  window: Any = None  # w: keys live in a ring of the last w positions
  origin: Any = None  # the q·kᵀ equation the scores come from

  def replace(self, **changes) -> "History":
    return dataclasses.replace(self, **changes)

  @property
  def exact_rows(self) -> bool:
    """Every row equals the training mode's at every key (a proven mask
    came first, and the keys are not a ring): as an output, a sequence."""
    return self.window is None and self.future.exact


Kind = Union[Unscanned, Scanned, Any]


def is_scanned(kind) -> bool:
  return isinstance(kind, Scanned)
