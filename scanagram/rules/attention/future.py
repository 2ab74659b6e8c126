"""The future record: what row i of attention scores holds at its future
keys j > i (and, under a window w, at keys j <= i - w), and how each
elementwise operation transforms it. See :class:`scanagram.kinds.History`."""
import numpy as np

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


def future_region(shape, axis, key_axis, window=None):
  """Boolean array broadcastable to ``shape``: True where key j > row i (or,
  with a window w, outside it: j <= i - w)."""
  rows, keys = rows_keys(shape, axis, key_axis)
  region = keys > rows
  if window is not None:
    region = region | (keys <= rows - window)
  return region


def as_marker(value):
  value = float(value)
  return NEG if value <= NEG_THRESHOLD else value


def operand_future(e, i, region):
  """What operand i holds at the future keys: TAINTED, EXACT, NEG, a float,
  or 'row' for a per-row (scanned) value."""
  kind = e.in_kinds[i]
  if isinstance(kind, History):
    return kind.future
  if is_scanned(kind):
    return "row"
  value = e.known(i)
  if value is None:
    return EXACT
  values = np.broadcast_to(value, np.broadcast_shapes(value.shape,
                                                      region.shape))
  picked = values[np.broadcast_to(region, values.shape)]
  if picked.size and np.all(picked == picked.flat[0]):
    return float(picked.flat[0])
  return EXACT


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

