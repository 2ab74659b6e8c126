"""Masks on attention scores, proven at conversion time: ``jnp.where`` with a
known mask, an additive mask, and the window a mask proves."""
import numpy as np

from scanagram.kinds import EXACT, LOW, NEG, History, UNSCANNED, is_scanned
from scanagram.rules.attention.future import (
    NEG_THRESHOLD, TAINTED_FINITE, future_region, is_neg, is_tainted,
    operand_future, picked_future, rows_keys)


def additive_mask(e, h, futures, region):
  """``scores + bias`` with a constant bias below NEG_THRESHOLD at every
  future key: LOW, once the bias is checked as a select's mask is (every row
  keeps a key; the window it proves). None when the equation is not that."""
  if e.primitive.name != "add":
    return None
  for scores, bias in ((0, 1), (1, 0)):
    # an unscanned operand's future is a float or EXACT, never NEG itself
    if futures[scores] is TAINTED_FINITE and e.in_kinds[bias] is UNSCANNED \
        and is_neg(futures[bias]):
      values = e.known(bias)
      full = np.broadcast_shapes(values.shape, region.shape)
      fill_like = np.broadcast_to(values <= NEG_THRESHOLD, full)
      _refuse_empty_rows(e, h, fill_like, full)
      if h.window is None:
        _record_window(e, h, _proven_window(h, fill_like, full))
      return LOW
  return None


def _record_window(e, h, window):
  if window is not None:
    windows = e.context.setdefault("windows", {})
    windows[h.origin] = max(windows.get(h.origin, 0), window)


def select_future(e, h):
  """The future record of ``jnp.where(mask, scores, fill)`` on scores ``h``
  (recording the window its mask proves), or refuse."""
  if e.in_kinds[0] is not UNSCANNED:
    raise e.refuse("its mask depends on the scanned input")
  mask = e.known(0)
  if mask is None:
    raise e.refuse(
        "its mask depends on an input of the function, so scanagram cannot "
        "check at conversion time that it removes the future positions")
  # every layer of a model applies the same mask: prove it once
  cases = [_case_key(e, i) for i in range(1, len(e.in_kinds))]
  key = (_value_key(mask), e.out_avals[0].shape, h.axis, h.key_axis,
         h.window, tuple(cases))
  proofs = e.context.setdefault("mask_proofs", {})
  if key not in proofs:
    proofs[key] = _prove_mask(e, h, mask)
  future, window = proofs[key]
  _record_window(e, h, window)
  return future


def _value_key(value):
  """Compares equal exactly when the arrays are equal (dtype, shape, bytes)."""
  value = np.asarray(value)
  return value.dtype.str, value.shape, value.tobytes()


def _case_key(e, i):
  """What the proof depends on in case ``i`` of a select."""
  kind = e.in_kinds[i]
  if isinstance(kind, History):
    return "history", kind.future
  if is_scanned(kind):
    return ("row",)
  value = e.known(i)
  return "known", None if value is None else _value_key(value)


def _prove_mask(e, h, mask):
  """(future record of the select's output, window the mask proves or
  None), or refuse."""
  shape = e.out_avals[0].shape
  region = future_region(shape, h.axis, h.key_axis, h.window)
  full = np.broadcast_shapes(mask.shape, region.shape)
  choice = np.broadcast_to(mask, full).astype(np.int64)
  in_region = np.broadcast_to(region, full)
  if any(getattr(k, "future", None) is LOW for k in e.in_kinds[1:]):
    # which keys a row keeps then depends on both masks together
    raise e.refuse("it masks scores that an additive mask has already "
                   "masked: scanagram proves one mask per score, so use "
                   "either jnp.where or the additive mask")
  picked, fill_like = [], np.zeros(full, bool)
  for case in range(1, len(e.in_kinds)):
    where = in_region & (choice == case - 1)
    if not where.any():
      continue
    f = operand_future(e, case, region)
    if is_tainted(f):
      index = np.argwhere(where)[0]
      which = ("a future position (a causal mask keeps key j for query i "
               "only when j <= i)" if index[h.key_axis] > index[h.axis] else
               f"outside the window of {h.window}")
      raise e.refuse(f"its mask keeps key {index[h.key_axis]} for query "
                     f"{index[h.axis]}: {which}")
    value = e.known(case)
    if value is not None:
      value = np.broadcast_to(value, np.broadcast_shapes(value.shape, full))
      picked_values = value[where]
      f = (float(picked_values.flat[0])
           if np.all(picked_values == picked_values.flat[0]) else EXACT)
      if isinstance(f, float):
        same = value == f if not is_neg(f) else value <= NEG_THRESHOLD
        fill_like |= (choice == case - 1) & same
    picked.append(EXACT if f == "row" else f)
  future = picked_future(picked)
  if future is NEG:
    _refuse_empty_rows(e, h, fill_like, full)
  window = None
  if h.window is None and (future is NEG or isinstance(future, float)):
    window = _proven_window(h, fill_like, full)
  return future, window


def _kept(h, fill_like, shape):
  """Where the mask keeps a past or present key (j <= i) that is not fill."""
  rows, keys = rows_keys(shape, h.axis, h.key_axis)
  return ~fill_like & np.broadcast_to(keys <= rows, shape)


def _refuse_empty_rows(e, h, fill_like, shape):
  """A row whose every past key is filled too has its maximum at the fill:
  softmax then spreads the row's weight evenly over all L keys, future ones
  included, so that row is not causal in the training mode itself."""
  empty = ~_kept(h, fill_like, shape).any(axis=h.key_axis, keepdims=True)
  if empty.any():
    row = np.argwhere(empty)[0][h.axis]
    raise e.refuse(
        f"its mask keeps no key at all for query {row}: the row is all fill, "
        "so softmax gives every position the same weight, future ones "
        "included (a causal mask keeps at least key j = i)")




def _proven_window(h, fill_like, shape):
  """The smallest w with every key j <= i - w picked as fill, or None when
  that is the whole sequence."""
  rows, keys = rows_keys(shape, h.axis, h.key_axis)
  distance = np.broadcast_to(rows - keys, shape)[_kept(h, fill_like, shape)]
  window = int(distance.max()) + 1 if distance.size else 1
  return window if window < shape[h.key_axis] else None


