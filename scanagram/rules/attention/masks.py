"""Masks on attention scores, proven at conversion time: ``jnp.where`` with a
known mask, an additive mask, and the window a mask proves.

A proof never builds the L×L mask: the mask is a function of its indices
(:mod:`scanagram.symbolic`), and each check visits one point per piece of
each query's keys on which the mask, the cases and the future region are all
constant (O(L · atoms) for a mask made from ``iota``; every key, block by
block, for an arbitrary constant array). The checks give what evaluating
them on the whole array would: the first offending element in C order, the
first empty row, the largest distance kept."""
import numpy as np

from scanagram import symbolic
from scanagram.kinds import (EXACT, LOW, NEG, NEG_THRESHOLD, TAINTED_FINITE,
                             Future, History, UNSCANNED, is_scanned)
from scanagram.rules.attention.learning import ATTENTION
from scanagram.rules.attention.future import (
    Same, future_region, operand_future, picked_future)


# what masks padding instead of a mask made from the data: each row's length
USE_LENGTHS = (
    "give each row's length instead (`to_step(..., batch_axes=...)`, then "
    "`prefill(..., lengths=...)`), which masks padding exactly")


def padding_mask(what):
  """The refusal's end for a padding mask (or bias) computed from the data."""
  return (f"scanagram checks masks at conversion time, and a {what} computed "
          f"from the data is not known then. Drop it and {USE_LENGTHS}")


def _cannot_check(why):
  return ("scanagram cannot check at conversion time that its mask removes "
          f"the future positions: {why}")


def additive_mask(e, h, futures, region):
  """``scores + bias`` with a constant bias below NEG_THRESHOLD at every
  future key: LOW, once the bias is checked as a select's mask is (every row
  keeps a key; the window it proves). None when the equation is not that."""
  if e.primitive.name != "add":
    return None
  for scores, bias in ((0, 1), (1, 0)):
    # an unscanned operand's future is a constant or EXACT, never NEG itself
    if futures[scores] == TAINTED_FINITE and e.in_kinds[bias] is UNSCANNED \
        and futures[bias].below:
      shape = e.out_avals[0].shape
      values = symbolic.lift(e.known(bias), shape, e.in_avals[bias].dtype)
      key = ("additive", values.key, shape, h.axis, h.key_axis, h.window)
      proofs = e.conversion.notes(ATTENTION).mask_proofs
      if key not in proofs:
        try:
          proofs[key] = _fill_check(
              shape, h, [values],
              lambda idx: values.at(idx) <= NEG_THRESHOLD)
        except symbolic.TooLarge as err:
          raise e.refuse(_cannot_check(err)) from None
      empty_row, window = proofs[key]
      _refuse_empty_rows(e, empty_row)
      if h.window is None:
        _record_window(e, h, window)
      return LOW
  return None


def multiplicative_window(e, h, futures):
  """``weights * mask`` with a constant mask that is 0 at every future key
  (kernel attention, ``exp(q·k) * mask``): records the window the mask
  proves (its zeros at the keys j <= i - w), as a select's does."""
  if e.primitive.name != "mul" or h.window is not None:
    return
  for scores, mask in ((0, 1), (1, 0)):
    if e.in_kinds[mask] is UNSCANNED and futures[mask].zero and isinstance(
        e.in_kinds[scores], History):
      value = e.known(mask)
      if value is None or isinstance(value, symbolic.Unavailable):
        return
      shape = e.out_avals[0].shape
      values = symbolic.lift(value, shape, e.in_avals[mask].dtype)
      key = ("multiplicative", values.key, shape, h.axis, h.key_axis)
      proofs = e.conversion.notes(ATTENTION).mask_proofs
      if key not in proofs:
        try:
          proofs[key] = _fill_check(shape, h, [values],
                                    lambda idx: values.at(idx) == 0)
        except symbolic.TooLarge:
          return
      _record_window(e, h, proofs[key][1])
      return


def _record_window(e, h, window):
  if window is not None:
    e.conversion.notes(ATTENTION).record_window(h.origin, window)


def select_future(e, h):
  """The future record of ``jnp.where(mask, scores, fill)`` on scores ``h``
  (recording the window its mask proves), or refuse."""
  if is_scanned(e.in_kinds[0]):   # per query: a padding mask
    raise e.refuse("its mask depends on the scanned input: "
                   + padding_mask("padding mask"))
  if e.in_kinds[0] is not UNSCANNED:
    raise e.refuse("its mask depends on the scanned input")
  mask = e.known(0)
  if mask is None:
    raise e.refuse(
        "its mask depends on an input of the function, so scanagram cannot "
        "check at conversion time that it removes the future positions. "
        "Build the causal mask inside the function (`jnp.tril`, or compare "
        f"`jnp.arange` positions), and for padding {USE_LENGTHS}")
  if isinstance(mask, symbolic.Unavailable):
    raise e.refuse(_cannot_check(mask.why))
  shape = e.out_avals[0].shape
  mask = symbolic.lift(mask, shape, e.in_avals[0].dtype)
  cases = [_case(e, i) for i in range(1, len(e.in_kinds))]
  # every layer of a model applies the same mask: prove it once
  key = (mask.key, shape, h.axis, h.key_axis, h.window,
         tuple(_case_key(c) for c in cases))
  proofs = e.conversion.notes(ATTENTION).mask_proofs
  if key not in proofs:
    try:
      proofs[key] = _prove_mask(e, h, mask, cases)
    except symbolic.TooLarge as err:
      raise e.refuse(_cannot_check(err)) from None
  future, window = proofs[key]
  _record_window(e, h, window)
  return future


def _case(e, i):
  """Case ``i`` of a select: its kind, and its value as a Lazy when it is a
  known constant (else None: the same array in both modes)."""
  kind = e.in_kinds[i]
  value = None
  if kind is UNSCANNED:
    value = e.known(i)
    if isinstance(value, symbolic.Unavailable):
      value = None
    if value is not None:
      value = symbolic.lift(value, e.out_avals[0].shape, e.in_avals[i].dtype)
  return kind, value


def _case_key(case):
  """What the proof depends on in a case of a select: its value when known,
  else its record (EXACT but for scores: the same array in both modes)."""
  kind, value = case
  if value is not None:
    return "known", value.key
  return "record", kind.future if isinstance(kind, History) else EXACT


def _prove_mask(e, h, mask, cases):
  """(future record of the select's output, window the mask proves or
  None), or refuse."""
  if any(isinstance(kind, History) and kind.future == LOW
         for kind, _ in cases):
    # which keys a row keeps then depends on both masks together
    raise e.refuse("it masks scores that an additive mask has already "
                   "masked: scanagram proves one mask per score, so use "
                   "either jnp.where or the additive mask")
  shape = e.out_avals[0].shape
  region = future_region(shape, h.axis, h.key_axis, h.window)
  known = [value for _, value in cases if value is not None]
  # per case: the first future point where the mask picks it, and whether
  # a known case is one value at all of them
  firsts = [None] * len(cases)
  same = [Same() for _ in cases]
  for points in symbolic.sweep(shape, h.axis, h.key_axis, [mask] + known,
                               region.windows):
    idx = points.idx
    choice = mask.at(idx).astype(np.int64)
    in_region = points.valid & region.at(idx)
    for c, (_, value) in enumerate(cases):
      where = in_region & (choice == c)
      if not where.any():
        continue
      first = symbolic.first_index(idx, where)
      if firsts[c] is None or first < firsts[c]:
        firsts[c] = first
      if value is not None:
        same[c].add(value.at(idx)[where])
  picked, fills = [], []
  for c, (kind, value) in enumerate(cases):
    if firsts[c] is None:
      continue
    f = operand_future(e, c + 1, region) if value is None else EXACT
    if f.tainted:
      index = firsts[c]
      which = ("a future position (a causal mask keeps key j for query i "
               "only when j <= i)" if index[h.key_axis] > index[h.axis] else
               f"outside the window of {h.window}")
      raise e.refuse(f"its mask keeps key {index[h.key_axis]} for query "
                     f"{index[h.axis]}: {which}")
    if value is not None:
      one = same[c].value
      f = EXACT if one is None else Future.constant(one)
      if f.value is not None:
        fills.append((c, value, f))
    picked.append(f)
  future = picked_future(picked)
  window = None
  # a fill at every future key (NEG or one constant) may prove a window
  need_window = h.window is None and (future == NEG or
                                      future.value is not None)
  if future == NEG or need_window:
    def fill_like(idx):
      """Where the mask picks a case that holds its fill value there."""
      choice = mask.at(idx).astype(np.int64)
      out = np.zeros(choice.shape, bool)
      for c, value, f in fills:
        v = value.at(idx)
        out |= (choice == c) & (v <= NEG_THRESHOLD if f.below else
                                v == f.value)
      return out
    empty_row, window = _fill_check(shape, h, [mask] + known, fill_like)
    # a row all -inf is the same in both modes (exp of it minus its
    # maximum is NaN, or 0 where a guard shifts by 0): only a finite fill
    # spreads weight over the future keys
    minus_inf = len(fills) == len(picked) and all(
        f.value == -np.inf for _, _, f in fills)
    if future == NEG and not minus_inf:
      _refuse_empty_rows(e, empty_row)
    if not need_window:
      window = None
  return future, window


def _fill_check(shape, h, values, fill_like):
  """``(first empty row or None, proven window or None)`` of scores whose
  fill is where ``fill_like`` (a function of sweep points) holds. A kept
  key is a past or present key (j <= i) that is not fill; a row is empty
  when it keeps none; the proven window is the smallest w with every key
  j <= i - w fill (None when that is the whole sequence)."""
  empty, distance = None, -1
  for points in symbolic.sweep(shape, h.axis, h.key_axis, values,
                               () if h.window is None else (h.window,)):
    idx = points.idx
    rows, keys = idx[h.axis], idx[h.key_axis]
    kept = points.valid & ~fill_like(idx) & (keys <= rows)
    has = kept.any(axis=1)
    if not has.all():  # the row's index, with key 0 as argwhere gives it
      starts = tuple(np.zeros_like(ix[:, 0]) if d == h.key_axis else ix[:, 0]
                     for d, ix in enumerate(idx))
      first = symbolic.first_index(starts, ~has)
      empty = first if empty is None or first < empty else empty
    if kept.any():
      distance = max(distance, int((rows - keys)[kept].max()))
  window = distance + 1 if distance >= 0 else 1
  return (None if empty is None else empty[h.axis],
          window if window < shape[h.key_axis] else None)


def _refuse_empty_rows(e, row):
  """A row whose every past key is filled too has its maximum at the fill:
  softmax then spreads the row's weight evenly over all L keys, future ones
  included, so that row is not causal in the training mode itself."""
  if row is not None:
    raise e.refuse(
        f"its mask keeps no key at all for query {row}: the row is all fill, "
        "so softmax gives every position the same weight, future ones "
        "included (a causal mask keeps at least key j = i)")
