"""The future record: what row i of attention scores holds at its future
keys j > i (and, under a window w, at keys j <= i - w), and how each
elementwise operation transforms it. See :class:`scanagram.kinds.History`."""
from typing import NamedTuple, Optional, Tuple

import numpy as np

from scanagram import symbolic
from scanagram.interpreter import bind
from scanagram.kinds import EXACT, LOW, NEG, TAINTED, History, is_scanned

NEG_THRESHOLD = -1e4

# TAINTED values that are finite in the step: q·kᵀ against a zero-filled
# buffer gives finite scores there, and these ops keep them finite. Only
# finite taint may be multiplied away by an exact 0 (0 · inf is NaN).
TAINTED_FINITE = type(TAINTED)("TAINTED_FINITE")
_KEEPS_FINITE = frozenset("""
add sub mul neg max min abs sign tanh logistic sin cos atan erf clamp
integer_pow convert_element_type stop_gradient copy reduce_precision name
sharding_constraint
""".split())


def is_tainted(future) -> bool:
  return future is TAINTED or future is TAINTED_FINITE


# -- what row i holds at its future keys j > i --------------------------------
def rows_keys(shape, axis, key_axis):
  rows = np.arange(shape[axis]).reshape(
      [-1 if d == axis else 1 for d in range(len(shape))])
  keys = np.arange(shape[key_axis]).reshape(
      [-1 if d == key_axis else 1 for d in range(len(shape))])
  return rows, keys


class Region(NamedTuple):
  """The future keys of scores of ``shape``: key j > row i (and, with a
  window w, the keys outside it, j <= i - w), as a function of the
  indices (never an L×L array)."""
  shape: Tuple[int, ...]
  axis: int
  key_axis: int
  window: Optional[int] = None

  @property
  def windows(self):
    """Where the region changes along the keys besides j = i + 1."""
    return () if self.window is None else (self.window,)

  def at(self, idx):
    """Whether each point of a :func:`scanagram.symbolic.sweep` is in it."""
    rows, keys = idx[self.axis], idx[self.key_axis]
    region = keys > rows
    if self.window is not None:
      region = region | (keys <= rows - self.window)
    return region

  def nonempty(self) -> bool:
    nq, nk = self.shape[self.axis], self.shape[self.key_axis]
    if 0 in self.shape:
      return False
    return nk > 1 or (self.window is not None and nq > self.window)

  def __array__(self, dtype=None, copy=None):
    """The old form: a boolean array broadcastable to ``shape``."""
    rows, keys = rows_keys(self.shape, self.axis, self.key_axis)
    region = keys > rows
    if self.window is not None:
      region = region | (keys <= rows - self.window)
    return region if dtype is None else region.astype(dtype)


def future_region(shape, axis, key_axis, window=None) -> Region:
  """The future keys of scores of ``shape`` (see :class:`Region`)."""
  return Region(tuple(shape), axis, key_axis, window)


def as_marker(value):
  value = float(value)
  return NEG if value <= NEG_THRESHOLD else value


class Same:
  """Whether the values added so far (block by block) are all one value
  (as ``np.all(values == values.flat[0])``: NaN never is)."""

  def __init__(self):
    self.first, self.seen, self.same = None, False, True

  def add(self, values):
    values = np.asarray(values).reshape(-1)
    if not values.size:
      return
    if not self.seen:
      self.first, self.seen = values[0], True
    if self.same and not np.all(values == self.first):
      self.same = False

  @property
  def value(self):
    """The one value, or None (none seen, or several)."""
    return self.first if self.seen and self.same else None


def known_future(value, region: Region, dtype=None):
  """What a constant holds at the future keys: the float it is at every
  one of them, else EXACT (the same in both modes). Checked at one point
  per piece of each row (:func:`scanagram.symbolic.sweep`)."""
  if not region.nonempty():
    return EXACT
  scalar = symbolic.scalar_value(value)
  if scalar is not None:
    return float(scalar)
  value = symbolic.lift(value, region.shape, dtype)
  same = Same()
  for points in symbolic.sweep(region.shape, region.axis, region.key_axis,
                               [value], region.windows):
    where = points.valid & region.at(points.idx)
    same.add(value.at(points.idx)[where])
    if not same.same:
      break
  return EXACT if same.value is None else float(same.value)


def operand_future(e, i, region):
  """What operand i holds at the future keys: TAINTED, EXACT, NEG, a float,
  or 'row' for a per-row (scanned) value."""
  kind = e.in_kinds[i]
  if isinstance(kind, History):
    return kind.future
  if is_scanned(kind):
    return "row"
  value = e.known(i)
  if value is None or isinstance(value, symbolic.Unavailable):
    # not known: the same array in both modes
    return EXACT
  try:
    return known_future(value, region, e.in_avals[i].dtype)
  except symbolic.TooLarge:
    return EXACT  # the same array in both modes, whatever it holds


def is_exact_history(kind) -> bool:
  """Scores whose every row equals the training mode's at every key (a
  proven mask came first, and the keys are not a ring)."""
  return (isinstance(kind, History) and kind.window is None and
          (kind.future in (EXACT, NEG) or isinstance(kind.future, float)))


def is_neg(f):
  return f is NEG or (isinstance(f, float) and f <= NEG_THRESHOLD)


def combine_future(e, futures):
  """The output's future record from its operands' (elementwise ops)."""
  name = e.primitive.name
  if any(f is LOW for f in futures):
    return combine_low(name, futures)
  tainted = [f for f in futures if is_tainted(f)]
  finite = all(f is TAINTED_FINITE for f in tainted)
  if name == "div" and futures[0] is TAINTED_FINITE and isinstance(
      futures[1], float) and np.isfinite(futures[1]) and futures[1] != 0:
    return TAINTED_FINITE  # scores / sqrt(d): a finite, nonzero constant
  if name in ("mul", "and") and finite and any(
      f == 0.0 and not isinstance(f, str) for f in futures):
    return 0.0  # 0 times a value that is finite in both modes
  if tainted:
    return TAINTED_FINITE if finite and name in _KEEPS_FINITE else TAINTED
  if all(isinstance(f, float) for f in futures):
    scalars = [np.asarray(f, a.dtype) for f, a in zip(futures, e.in_avals)]
    out = bind(e.eqn, scalars, scalar_params(e.params))[0]
    return as_marker(out) if np.isfinite(out) or out < 0 else EXACT
  if name in ("sub", "add") and is_neg(futures[0]) and not is_neg(
      futures[1]) and futures[1] != float("inf"):
    return NEG
  if name == "add" and is_neg(futures[1]) and not is_neg(futures[0]):
    return NEG
  if name in ("exp", "exp2") and is_neg(futures[0]):
    return 0.0
  if name == "div" and futures[0] == 0.0 and not isinstance(futures[0], str):
    return 0.0
  if name in ("stop_gradient", "copy", "reduce_precision", "name",
              "convert_element_type", "sharding_constraint") and (
                  futures[0] is NEG or futures[0] == 0.0):
    return futures[0]
  if name == "max" and all(is_neg(f) for f in futures):
    return NEG
  return EXACT


def combine_low(name, futures):
  """LOW is known to be large and negative, not exact: it stays so when a
  finite exact value (the row maximum) is added or subtracted, and ``exp``
  turns it into exactly 0. Anything else may differ between the modes."""
  others = [f for f in futures if f is not LOW]
  if any(is_tainted(f) for f in others):
    return TAINTED
  if name in ("exp", "exp2"):
    return 0.0
  finite = all(f is EXACT or (isinstance(f, float) and np.isfinite(f) and
                              not is_neg(f)) for f in others)
  if finite and (name == "add" or (name == "sub" and futures[0] is LOW)):
    return LOW
  if name == "max" and all(is_neg(f) for f in others):
    return LOW
  if name in ("stop_gradient", "copy", "reduce_precision", "name",
              "convert_element_type", "sharding_constraint"):
    return LOW
  return TAINTED


def scalar_params(params):
  """``params`` for binding on scalars: no sharding of the full shape."""
  return {k: (None if k == "sharding" else v) for k, v in params.items()}



def picked_future(picked):
  if not picked:
    return EXACT
  if all(isinstance(f, float) for f in picked) and len(set(picked)) == 1:
    return as_marker(picked[0])
  if all(is_neg(f) for f in picked):
    return NEG
  return EXACT

