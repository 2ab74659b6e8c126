"""The future record (:class:`scanagram.kinds.Future`): what row i of
attention scores holds at its future keys j > i (and, under a window w, at
keys j <= i - w), and how each operation transforms it: elementwise ops
through :data:`TRANSFER`, a select through :func:`picked_future`, reductions
through :func:`allows_reduction` and :func:`reduced_future`."""
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from scanagram import symbolic
from scanagram.interpreter import bind
from scanagram.kinds import (EXACT, LOW, NEG, TAINTED, TAINTED_FINITE, Future,
                             History, is_scanned)


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
  """What a constant holds at the future keys: the number it is at every
  one of them, else EXACT (the same in both modes). Checked at one point
  per piece of each row (:func:`scanagram.symbolic.sweep`)."""
  if not region.nonempty():
    return EXACT
  scalar = symbolic.scalar_value(value)
  if scalar is not None:
    return Future.constant(scalar)
  value = symbolic.lift(value, region.shape, dtype)
  same = Same()
  for points in symbolic.sweep(region.shape, region.axis, region.key_axis,
                               [value], region.windows):
    where = points.valid & region.at(points.idx)
    same.add(value.at(points.idx)[where])
    if not same.same:
      break
  return EXACT if same.value is None else Future.constant(same.value)


def operand_future(e, i, region) -> Future:
  """What operand i holds at the future keys: a History's record, EXACT for
  a scanned operand (one value per row, the same in both modes), a known
  constant's number."""
  kind = e.in_kinds[i]
  if isinstance(kind, History):
    return kind.future
  if is_scanned(kind):
    return EXACT
  value = e.known(i)
  if value is None or isinstance(value, symbolic.Unavailable):
    # not known: the same array in both modes
    return EXACT
  try:
    return known_future(value, region, e.in_avals[i].dtype)
  except symbolic.TooLarge:
    return EXACT  # the same array in both modes, whatever it holds


# -- elementwise ops: one transfer table ---------------------------------------
# ops that keep finite values finite: q·kᵀ against a zero-filled buffer
# gives finite scores (TAINTED_FINITE), and only finite taint may be
# multiplied away by an exact 0 (0 · inf is NaN). ``exp`` is among them:
# kernel attention (``exp(q·k / sqrt(d)) * mask``, summed) assumes its
# logits do not overflow, as the training mode does (an overflow there is
# inf or NaN already)
_KEEPS_FINITE = frozenset("""
add sub mul neg max min abs sign tanh logistic sin cos atan erf clamp
integer_pow convert_element_type stop_gradient copy reduce_precision name
sharding_constraint reshard exp exp2
""".split())

# primitive name -> refinement of the default rule (see transfer): the
# output's record from the operands', or None where the default applies
TRANSFER: Dict[str, Callable[[List[Future]], Optional[Future]]] = {}


def transfer(name: str, futures: List[Future], evaluate) -> Future:
  """The record of an elementwise op's output from its operands' records:

  * all operands constants: the op on them (``evaluate`` runs it on one
    number per operand, see :func:`on_scalars`);
  * else the op's refinement in :data:`TRANSFER`, where it applies;
  * else the default: an inexact operand gives TAINTED (TAINTED_FINITE when
    every inexact operand is finite and the op keeps finite values finite);
    exact operands give EXACT.
  """
  if all(f.value is not None for f in futures):
    return _computed(evaluate([f.value for f in futures]))
  refine = TRANSFER.get(name)
  refined = refine(futures) if refine else None
  if refined is not None:
    return refined
  inexact = [f for f in futures if not f.exact]
  if not inexact:
    return EXACT
  if name in _KEEPS_FINITE and all(f.finite for f in inexact):
    return TAINTED_FINITE
  return TAINTED


def _computed(number) -> Future:
  """The record of a constant an op computed: +inf and NaN only as EXACT,
  below NEG_THRESHOLD as NEG (see :func:`_on_scores`)."""
  number = float(number)
  if np.isnan(number) or number == np.inf:
    return EXACT
  return _on_scores(Future.constant(number))


def _on_scores(future: Future) -> Future:
  """A constant as the scores' record keeps it: below NEG_THRESHOLD only
  that it is below (NEG), whatever the fill (-1e9, -inf)."""
  return NEG if future.exact and future.below else future


def on_scalars(e):
  """Runs equation ``e``'s op on one number per operand (in the operands'
  dtypes), returning one number."""
  def run(numbers):
    scalars = [np.asarray(x, a.dtype) for x, a in zip(numbers, e.in_avals)]
    return bind(e.eqn, scalars, _scalar_params(e.params))[0]
  return run


def _scalar_params(params):
  """``params`` for binding on scalars: no sharding of the full shape."""
  return {k: (None if k == "sharding" else v) for k, v in params.items()}


def _refines(*names):
  """Registers the decorated refinement in :data:`TRANSFER` for ``names``."""
  def register(refinement):
    for name in names:
      TRANSFER[name] = refinement
    return refinement
  return register


def _plain(future: Future) -> bool:
  """Exact, above the threshold and not known to be infinite or NaN: what
  a row maximum is taken to be."""
  return future.exact and not future.below and (
      future.value is None or math.isfinite(future.value))


def _below(exact: bool) -> Future:
  """Below the threshold: NEG when exact, LOW when not."""
  return NEG if exact else LOW


@_refines("add")
def _add(futures):
  """Below the threshold plus a plain value stays below: NEG when exact,
  LOW when not (finite scores plus an additive mask, then a row maximum)."""
  a, b = futures
  for below, other in ((a, b), (b, a)):
    if below.below and _plain(other):
      return _below(below.exact)
  return None


@_refines("sub")
def _sub(futures):
  """Below the threshold minus a plain value (the row maximum softmax
  subtracts) stays below: NEG when exact, LOW when not."""
  a, b = futures
  if a.below and _plain(b):
    return _below(a.exact)
  return None


@_refines("max")
def _max(futures):
  """The maximum of values all below the threshold is below it: NEG when
  all are exact, LOW when not."""
  if all(f.below for f in futures):
    return _below(all(f.exact for f in futures))
  return None


@_refines("exp", "exp2")
def _exp(futures):
  """``exp`` below the threshold underflows to exactly 0 in both modes."""
  return Future.constant(0.0) if futures[0].below else None


@_refines("logistic")
def _sigmoid(futures):
  """``sigmoid`` below the threshold is exactly 0 in both modes (``exp(-x)``
  overflows): sigmoid attention masked with a -1e9 fill."""
  return Future.constant(0.0) if futures[0].below else None


@_refines("mul", "and")
def _times_zero(futures):
  """A constant 0 times operands that are each exact (taken as finite) or
  finite in both modes is 0."""
  if any(f.zero for f in futures) and all(f.exact or f.finite
                                          for f in futures):
    return Future.constant(0.0)
  return None


@_refines("div")
def _div(futures):
  """TAINTED_FINITE over a finite nonzero constant (scores / sqrt(d)) stays
  TAINTED_FINITE; a constant 0 over an exact value is 0."""
  numerator, denominator = futures
  if numerator == TAINTED_FINITE and denominator.value is not None and (
      math.isfinite(denominator.value) and denominator.value != 0):
    return TAINTED_FINITE
  if numerator.zero and denominator.exact:
    return Future.constant(0.0)
  return None


@_refines("stop_gradient", "copy", "reduce_precision", "name",
          "convert_element_type", "sharding_constraint", "reshard")
def _identity(futures):
  """Ops that pass their operand's values on keep its record."""
  return futures[0]


# -- a select and reductions ---------------------------------------------------
def picked_future(picked: List[Future]) -> Future:
  """The record of a select's output from the (exact) records of the cases
  its mask picks at the future keys: their one constant when all are it,
  NEG when all are below the threshold, else EXACT."""
  if not picked:
    return EXACT
  if picked[0].value is not None and all(f == picked[0] for f in picked):
    return _on_scores(picked[0])
  if all(f.below for f in picked):
    return NEG
  return EXACT


def allows_reduction(future: Future, name: str, window=None) -> bool:
  """Whether ``name`` over the keys of scores with record ``future`` gives
  the training mode's result. Over all L keys: exact rows allow any
  reduction; rows below the threshold but not exact (LOW) only a maximum,
  which the kept keys decide. Over a ``window``'s ring of keys, the keys
  outside it must not count either: a maximum of rows below the threshold
  there, a sum of zeros."""
  over_all_keys = future.exact or (future.below and
                                   name in ("reduce_max", "argmax"))
  if window is None:
    return over_all_keys
  return over_all_keys and ((name == "reduce_max" and future.below) or
                            (name == "reduce_sum" and future.zero))


def reduced_future(future: Future, name: str) -> Future:
  """The record after ``name`` over axes other than the rows and keys: a sum
  keeps a tainted record (finite stays finite) and 0, a maximum keeps LOW;
  anything else makes an inexact record TAINTED and an exact one EXACT."""
  if future.tainted and name == "reduce_sum":
    return future
  if future == LOW and name == "reduce_max":
    return LOW
  if not future.exact:
    return TAINTED
  return future if future.zero and name == "reduce_sum" else EXACT
