"""Attention: the key/value cache, derived and proven.

``q·kᵀ`` (a ``dot_general`` pairing every position of one sequence with every
position of another) is not causal by itself. Its rule keeps a buffer of the
keys (the operand as it enters the contraction) of length L and gives the
scores the kind ``History``: rows are scanned, the key axis holds all L
positions, and in a block the keys after the newest element differ from
the training mode (``future=TAINTED``). The rules here follow that record
through the graph:

* a ``select_n`` (``jnp.where``) whose mask is known at conversion time and
  picks the same constant at every future key of every row makes the scores
  exact (``future`` = that constant);
* adding a constant that is below ``NEG_THRESHOLD`` at every future key (an
  additive mask, ``logits + where(tril, 0, -1e9)``) makes them ``LOW``:
  large and negative in both modes, though not the same number, so only
  softmax's max and ``exp`` (which makes them exactly 0) may follow;
* elementwise ops carry the record: a large negative constant minus a finite
  row maximum stays large and negative (``NEG``), ``exp`` of it is exactly 0,
  0 times or over a finite value is 0;
* a reduction over the keys (softmax's max and sum) accepts only exact rows;
* the contraction of the weights with values over the key axis keeps a
  buffer of the values and accepts only weights that are exactly 0 at every
  future key, so the unfilled part of the buffer cannot reach the output.

Anything else on scores is refused. The assumption behind ``NEG``: masked
logits are filled with a value below ``NEG_THRESHOLD`` (-1e4) and the row's
largest logit is more than ~100 above it, so ``exp`` underflows to 0 exactly,
as it does in the training mode.
"""
from typing import Any, NamedTuple

import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram.errors import ScanConversionError
from scanagram.interpreter import (Converted, bind, needs_length, register,
                                   time_block)
from scanagram.kinds import (EXACT, LOW, NEG, TAINTED, UNSCANNED, History,
                             Scanned, is_scanned)
from scanagram.rules import calls, elementwise, structural
from scanagram.rules.common import pointwise, with_size
from scanagram.rules.linalg import _dot_out_axis

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


def _is_tainted(future) -> bool:
  return future is TAINTED or future is TAINTED_FINITE


# -- buffers ------------------------------------------------------------------
class Buffer:
  """The past elements of a scanned value along its time axis, padded to its
  training length with zeros (finite, so 0 · unfilled = 0).

  The buffer is stored with the contraction's batch axes first (``perm``),
  the layout a hand-written KV cache has (``[B, H, L, dh]`` rather than the
  projections' ``[B, L, H, dh]``): XLA then reads it in place in both
  attention products instead of transposing the whole cache every step.
  ``axis`` is the time axis in that stored layout."""

  def __init__(self, time_axis: int, size: int, ahead: int, perm=None):
    self.perm = None if perm is None or list(perm) == sorted(perm) else perm
    self.time_axis = time_axis   # in the value's own layout
    self.axis = time_axis if self.perm is None else list(perm).index(
        time_axis)
    self.size, self.ahead = size, ahead

  def layout(self, x):
    return x if self.perm is None else jnp.transpose(x, self.perm)

  def advance(self, ctx, buf, x):
    """``(state, keys)``: the buffer after the block, and the keys the
    block's rows are computed with (the same, but for a ring's fresh
    block)."""
    needs_length(f"a buffer of the past {self.size} positions")
    x = self.layout(x)
    if ctx.fresh:
      full = self._pad(self._only_real(ctx, x, None))
      return full, full
    buf = self._write(buf, x.astype(buf.dtype), ctx.start + self.ahead,
                      ctx.count)
    return buf, buf

  def _pad(self, x):
    """Pads (or, for a value running ahead, cuts) ``x`` to L along time."""
    n = x.shape[self.axis]
    if n > self.size:
      return lax.slice_in_dim(x, 0, self.size, axis=self.axis)
    widths = [(0, 0)] * x.ndim
    widths[self.axis] = (0, self.size - n)
    return jnp.pad(x, widths)

  def _only_real(self, ctx, x, axis):
    """Zeros past the real elements of a right-padded row (``axis``: x's
    time axis), so that padding never enters a buffer (0 · unfilled = 0
    needs it finite)."""
    if ctx.count is None:
      return x
    axis = self.axis if axis is None else axis
    real = ctx.real(self.size, self.ahead)
    keep = (jnp.arange(x.shape[axis]) < real).reshape(
        [-1 if d == axis else 1 for d in range(x.ndim)])
    return jnp.where(keep, x, jnp.zeros_like(x))

  def _write(self, buf, new, index, count):
    """Writes the first ``count`` (None: all) elements of ``new`` at
    ``index`` on. Elements past the end (a value running ahead computes them
    in the last blocks) and a padded row's padding are not written:
    dynamic_update_slice would clamp them onto, and replace, elements the
    remaining rows still read."""
    k = new.shape[self.axis]
    if k > self.size:   # a block longer than L: the rest is past L
      new, k = lax.slice_in_dim(new, 0, self.size, axis=self.axis), self.size
    if k == 1:
      slot = jnp.minimum(index, self.size - 1)
      keep = None if not self.ahead else index < self.size
      if count is not None:
        keep = count > 0 if keep is None else keep & (count > 0)
      if keep is not None:
        old = lax.dynamic_slice_in_dim(buf, slot, 1, self.axis)
        new = jnp.where(keep, new, old)
      return lax.dynamic_update_slice_in_dim(buf, new, slot, self.axis)
    # one contiguous write that fits: at `start`, clamped, with the old
    # elements kept where the block does not reach (slice-sized work, no
    # scatter: XLA keeps the buffer's layout)
    axis = self.axis
    start = jnp.clip(index, 0, self.size - k)
    source = jnp.arange(k) + start - index   # element of `new` at each slot
    real = k if count is None else count
    keep = ((source >= 0) & (source < real)).reshape(
        [k if d == axis else 1 for d in range(new.ndim)])
    shifted = jnp.take(new, jnp.clip(source, 0, k - 1), axis=axis)
    old = lax.dynamic_slice_in_dim(buf, start, k, axis)
    return lax.dynamic_update_slice_in_dim(
        buf, jnp.where(keep, shifted, old), start, axis)


class RingBuffer(Buffer):
  """The last ``window`` elements, element p in slot p mod window. A fresh
  block computes with the full buffer and keeps the ring; a block of one
  reads the ring. (Longer blocks on a ring run as steps.)"""

  def __init__(self, time_axis: int, size: int, ahead: int, window: int,
               perm=None):
    super().__init__(time_axis, size, ahead, perm)
    self.window = window

  def advance(self, ctx, ring, x):
    if ctx.fresh:   # rows over the full buffer; the ring from x itself,
      full, _ = super().advance(ctx, None, x)   # which may run past L
      x = self.layout(self._only_real(ctx, x, self.time_axis))
      if not x.shape[self.axis]:   # the empty state
        x = jnp.zeros_like(lax.slice_in_dim(full, 0, 1, axis=self.axis))
      newest = ctx.real(self.size, self.ahead) - 1
      slots = jnp.arange(self.window)
      positions = newest - jnp.mod(newest - slots, self.window)
      ring = jnp.take(x, jnp.clip(positions, 0, x.shape[self.axis] - 1),
                      axis=self.axis)
      valid = (positions >= 0).reshape(
          [-1 if d == self.axis else 1 for d in range(full.ndim)])
      return jnp.where(valid, ring, jnp.zeros_like(ring)), full
    if ctx.count is not None:
      x = self._only_real(ctx, x, self.time_axis)
    if not ctx.is_step:
      return self._block(ctx, ring, x)
    # element p replaces p - window, which no row from p on reads (a value
    # running ahead past L included: no clamping, unlike Buffer._write)
    index = ctx.start + self.ahead
    new = self.layout(x).astype(ring.dtype)
    slot = jnp.mod(index, self.window)
    if ctx.count is not None:
      old = lax.dynamic_slice_in_dim(ring, slot, 1, self.axis)
      new = jnp.where(ctx.count > 0, new, old)
    ring = lax.dynamic_update_slice_in_dim(ring, new, slot, self.axis)
    return ring, ring

  def _block(self, ctx, ring, x):
    """A block of k > 1: the rows read the ring in order of position, then
    the block (``window + k`` keys at positions ``first - window`` on, see
    :meth:`_Band.at_block`); the ring keeps the last ``window`` real ones."""
    w, axis = self.window, self.axis
    first = ctx.start + self.ahead
    ordered = jnp.take(ring, jnp.mod(first + jnp.arange(w), w), axis=axis)
    seq = lax.concatenate([ordered, self.layout(x).astype(ring.dtype)], axis)
    real = ctx.advanced
    last = lax.dynamic_slice_in_dim(seq, real, w, axis) if not isinstance(
        real, int) else lax.slice_in_dim(seq, real, real + w, axis=axis)
    end = first + real   # position just after the last one kept
    return jnp.take(last, jnp.mod(jnp.arange(w) - end, w), axis=axis), seq


def ring_positions(ctx, h, size):
  """The position each ring slot holds at this step (negative: not yet
  filled; such slots take the value of a key outside row t's window)."""
  needs_length(f"a table over {size} positions read at the ring's slots")
  newest = jnp.minimum(ctx.start + h.ahead, size - 1)  # see Buffer._write
  positions = newest - jnp.mod(newest - jnp.arange(h.window), h.window)
  outside = jnp.where(newest + 1 < size, newest + 1, newest - h.window)
  return jnp.where(positions >= 0, positions, outside)


def _batch_dims_first(params, avals, i):
  """``(perm, params)``: operand ``i`` of a dot_general transposed with its
  batch axes first, and the params that read that layout. Free axes keep
  their order, so the output's layout does not change."""
  (contract, batch) = params["dimension_numbers"]
  perm = list(batch[i]) + [d for d in range(avals[i].ndim)
                           if d not in batch[i]]
  contract, batch = [list(c) for c in contract], [list(b) for b in batch]
  contract[i] = [perm.index(d) for d in contract[i]]
  batch[i] = [perm.index(d) for d in batch[i]]
  return perm, dict(params, dimension_numbers=(tuple(map(tuple, contract)),
                                               tuple(map(tuple, batch))))


def _make_buffer(kind, e, i, window, params=None):
  """A buffer for operand ``i`` of the dot_general ``e``, batch axes first,
  and the equation's parameters that read that layout."""
  size = e.in_avals[i].shape[kind.axis]
  perm, params = _batch_dims_first(params or e.params, e.in_avals, i)
  if window is None:
    buffer = Buffer(kind.axis, size, kind.ahead, perm)
  else:
    buffer = RingBuffer(kind.axis, size, kind.ahead, window, perm)
  return buffer, params


def is_attention_contraction(e) -> bool:
  """Both operands scanned, neither scanned axis contracted nor batched."""
  if not all(is_scanned(k) for k in e.in_kinds):
    return False
  (contract, batch) = e.params["dimension_numbers"]
  return all(k.axis not in contract[s] and k.axis not in batch[s]
             for s, k in enumerate(e.in_kinds))


def dot_general_rule(e):
  """``q·kᵀ``: rows of the lhs against every position of the rhs. The rhs
  joins a buffer (a ring when a later mask proved a window); the scores are
  History with ``future=TAINTED``."""
  q, k = e.in_kinds
  dims = e.params["dimension_numbers"]
  ndims = [a.ndim for a in e.in_avals]
  origin = id(e.eqn)
  window = e.context.get("rings", {}).get(origin)
  if q.ahead != k.ahead:
    window = None
  kind = History(_dot_out_axis(dims, 0, q.axis, ndims),
                 _dot_out_axis(dims, 1, k.axis, ndims),
                 q.ahead, TAINTED_FINITE, window, origin)
  # with rows (the block vmapped), the queries' batch axes first too: XLA
  # would otherwise transpose the whole key buffer to meet them every step.
  # (Without rows the same transpose makes it copy every buffer instead.)
  q_perm, params = None, e.params
  if e.context.get("rows"):
    q_perm, params = _batch_dims_first(e.params, e.in_avals, 0)
    q_perm = None if q_perm == sorted(q_perm) else q_perm
  buffer, params = _make_buffer(k, e, 1, window, params)

  def advance(ctx, buf, ins):   # state: the key buffer
    qs, ks = ins
    buf, keys = buffer.advance(ctx, buf, ks)
    if q_perm is not None:
      qs = jnp.transpose(qs, q_perm)
    return buf, bind(e.eqn, [qs, keys], params)
  return Converted([kind], advance, True)


@register(P.dot_general_p, history=True, aligned=False)
def weights_times_values_rule(e):
  """Weights (History) contracted over their key axis with a scanned value's
  time axis: causal when the weights are exactly 0 at every future key. The
  values join a buffer."""
  hs = 0 if isinstance(e.in_kinds[0], History) else 1
  vs = 1 - hs
  h, v = e.in_kinds[hs], e.in_kinds[vs]
  (contract, batch) = e.params["dimension_numbers"]
  if not is_scanned(v) or h.key_axis not in contract[hs] or v.axis not in (
      contract[vs]) or (contract[hs].index(h.key_axis) !=
                        contract[vs].index(v.axis)):
    raise e.refuse(
        "attention scores may only be contracted over their key axis with "
        "the time axis of a value sequence")
  if h.axis in contract[hs] or h.axis in batch[hs]:
    raise e.refuse("it contracts the query positions of attention scores")
  if h.future != 0.0 or _is_tainted(h.future):
    raise e.refuse(_why_weights_not_zero(h))
  if v.ahead < h.ahead or (h.window is not None and v.ahead != h.ahead):
    raise e.refuse("its values run behind the attention rows")
  ndims = [a.ndim for a in e.in_avals]
  out_axis = _dot_out_axis((contract, batch), hs, h.axis, ndims)
  buffer, params = _make_buffer(v, e, vs, h.window)

  contract_weights_first = _weights_first(e, params, hs)

  def advance(ctx, buf, ins):   # state: the value buffer
    buf, values = buffer.advance(ctx, buf, ins[vs])
    return buf, contract_weights_first(ins[hs], values)
  return Converted([Scanned(out_axis, h.ahead)], advance, True)


def _weights_first(e, params, hs):
  """``dot(weights, values)`` with the weights as the left operand whatever
  the user's order (``einsum("...Thd,...htT->...", v, w)``): XLA's CPU dot
  then streams the value buffer as a plain matrix product does, instead of
  reading it transposed. The output is transposed back (it holds one
  position, so that costs nothing)."""
  if hs == 0:
    return lambda weights, values: bind(e.eqn, [weights, values], params)
  (contract, batch) = params["dimension_numbers"]
  swapped = dict(params, dimension_numbers=((contract[1], contract[0]),
                                            (batch[1], batch[0])))
  n_batch = len(batch[0])
  n_values, n_weights = (a.ndim - len(c) - n_batch
                         for a, c in zip(e.in_avals, contract))
  perm = (list(range(n_batch)) +
          list(range(n_batch + n_weights, n_batch + n_weights + n_values)) +
          list(range(n_batch, n_batch + n_weights)))

  def run(weights, values):
    out, = bind(e.eqn, [weights, values], swapped)
    return [jnp.transpose(out, perm)]
  return run


def _why_weights_not_zero(h):
  if _is_tainted(h.future):
    return ("it mixes attention scores over every position of the sequence "
            "and no causal mask removes the future positions (mask the "
            "logits with jnp.where(mask, logits, -1e9) before softmax)")
  return ("the attention weights at future positions are not provably zero "
          f"(they hold {h.future}): mask the logits with a large negative "
          "value such as -1e9 or -inf before softmax, not with 0")


# -- what row i holds at its future keys j > i --------------------------------
def _rows_keys(shape, axis, key_axis):
  rows = np.arange(shape[axis]).reshape(
      [-1 if d == axis else 1 for d in range(len(shape))])
  keys = np.arange(shape[key_axis]).reshape(
      [-1 if d == key_axis else 1 for d in range(len(shape))])
  return rows, keys


def _future_region(shape, axis, key_axis, window=None):
  """Boolean array broadcastable to ``shape``: True where key j > row i (or,
  with a window w, outside it: j <= i - w)."""
  rows, keys = _rows_keys(shape, axis, key_axis)
  region = keys > rows
  if window is not None:
    region = region | (keys <= rows - window)
  return region


def _as_marker(value):
  value = float(value)
  return NEG if value <= NEG_THRESHOLD else value


def _operand_future(e, i, region):
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


def _is_neg(f):
  return f is NEG or (isinstance(f, float) and f <= NEG_THRESHOLD)


def _combine_future(e, futures):
  """The output's future record from its operands' (elementwise ops)."""
  name = e.primitive.name
  if any(f is LOW for f in futures):
    return _combine_low(name, futures)
  tainted = [f for f in futures if _is_tainted(f)]
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
    out = bind(e.eqn, scalars, _scalar_params(e.params))[0]
    return _as_marker(out) if np.isfinite(out) or out < 0 else EXACT
  if name in ("sub", "add") and _is_neg(futures[0]) and not _is_neg(
      futures[1]) and futures[1] != float("inf"):
    return NEG
  if name == "add" and _is_neg(futures[1]) and not _is_neg(futures[0]):
    return NEG
  if name in ("exp", "exp2") and _is_neg(futures[0]):
    return 0.0
  if name == "div" and futures[0] == 0.0 and not isinstance(futures[0], str):
    return 0.0
  if name in ("stop_gradient", "copy", "reduce_precision", "name",
              "convert_element_type", "sharding_constraint") and (
                  futures[0] is NEG or futures[0] == 0.0):
    return futures[0]
  if name == "max" and all(_is_neg(f) for f in futures):
    return NEG
  return EXACT


def _combine_low(name, futures):
  """LOW is known to be large and negative, not exact: it stays so when a
  finite exact value (the row maximum) is added or subtracted, and ``exp``
  turns it into exactly 0. Anything else may differ between the modes."""
  others = [f for f in futures if f is not LOW]
  if any(_is_tainted(f) for f in others):
    return TAINTED
  if name in ("exp", "exp2"):
    return 0.0
  finite = all(f is EXACT or (isinstance(f, float) and np.isfinite(f) and
                              not _is_neg(f)) for f in others)
  if finite and (name == "add" or (name == "sub" and futures[0] is LOW)):
    return LOW
  if name == "max" and all(_is_neg(f) for f in others):
    return LOW
  if name in ("stop_gradient", "copy", "reduce_precision", "name",
              "convert_element_type", "sharding_constraint"):
    return LOW
  return TAINTED


def _scalar_params(params):
  """``params`` for binding on scalars: no sharding of the full shape."""
  return {k: (None if k == "sharding" else v) for k, v in params.items()}


def _history_axes(e):
  kinds = [k for k in e.in_kinds if isinstance(k, History)]
  axes = {(k.axis, k.key_axis) for k in kinds}
  if len(axes) != 1:
    raise e.refuse(f"it combines attention scores laid out differently "
                   f"({sorted(axes)})")
  (axis, key_axis), = axes
  windows = {k.window for k in kinds}
  if len(windows) != 1:
    raise e.refuse("it combines attention scores with different windows")
  for k in e.in_kinds:
    if is_scanned(k) and k.axis != axis:
      raise e.refuse("it combines attention scores with a sequence scanned "
                     "along another axis")
  ahead = min(k.ahead for k in e.in_kinds if k is not UNSCANNED)
  return History(axis, key_axis, ahead, TAINTED, windows.pop(),
                 kinds[0].origin)


def _history_pointwise(e, h, future, resize=None):
  """Runs an equation on scores position by position. In a ring's step,
  unscanned operands over all keys are gathered at the slots' positions,
  but a band (one value inside the window, another outside, as a sliding
  window's mask is) is computed from the positions, so a state with no other
  length-L table steps on past L."""
  out = h.replace(future=future)
  size = e.out_avals[0].shape[h.key_axis]
  gathered = [i for i, (k, a) in enumerate(zip(e.in_kinds, e.in_avals))
              if k is UNSCANNED and a.ndim and a.shape[h.key_axis] == size
              and size > 1]
  operand_axes = elementwise.broadcast_operand_axes(e, h.axis)
  bands = {}
  if h.window is not None:
    bands = {i: band for i in gathered
             if operand_axes[i] is not None
             for band in [_band(e, i, h)] if band is not None}
  for i in bands:   # run slices them itself
    operand_axes[i] = None

  def run(ctx, ins, params):
    ins = list(ins)
    if ctx.fresh:
      for i in bands:
        ins[i] = time_block(ctx, ins[i], h.axis, h.ahead)
    elif h.window is not None:
      for i, band in bands.items():
        ins[i] = band.at(ctx, h, e.in_avals[i].shape)
      if rest:
        positions = ring_positions(ctx, h, size)
        for i in rest:
          ins[i] = jnp.take(ins[i], positions, axis=h.key_axis)
    return bind(e.eqn, ins, params)
  rest = [i for i in gathered if i not in bands]
  converted = pointwise(e, operand_axes, [h.axis] * len(e.out_avals), resize,
                        run=run, out_kinds=[out] * len(e.out_avals))
  # a table read at the ring's slots serves blocks of one only
  return converted._replace(blocks=h.window is None or not rest)


class _Band(NamedTuple):
  """A constant over (rows, keys) that is ``inside`` where ``0 <= i - j <
  window`` and ``outside`` elsewhere."""
  inside: Any
  outside: Any

  def at(self, ctx, h, shape):
    """Its rows in this block over the keys the ring gives them: in a step
    the ring's slots (a slot not yet filled holds no key of the window), in
    a longer block the ring in order of position then the block's own."""
    w, k = h.window, ctx.size
    first = ctx.start + h.ahead
    if ctx.is_step:
      keys = first - jnp.mod(first - jnp.arange(w), w)
    else:
      keys = first - w + jnp.arange(w + k)
    rows = first + jnp.arange(k)
    distance = (rows.reshape([k if d == h.axis else 1
                              for d in range(len(shape))]) -
                keys.reshape([keys.size if d == h.key_axis else 1
                              for d in range(len(shape))]))
    inside = (distance >= 0) & (distance < w) & (
        keys >= 0).reshape([keys.size if d == h.key_axis else 1
                            for d in range(len(shape))])
    value = jnp.where(inside, self.inside, self.outside)
    target = [k if d == h.axis else keys.size if d == h.key_axis else n
              for d, n in enumerate(shape)]
    return jnp.broadcast_to(value, target)


def _band(e, i, h):
  """Operand ``i`` as a :class:`_Band` for ``h``'s window, or None."""
  values = e.known(i)
  if values is None or values.shape != e.in_avals[i].shape:
    return None
  rows, keys = _rows_keys(values.shape, h.axis, h.key_axis)
  inside = np.broadcast_to((rows - keys >= 0) & (rows - keys < h.window),
                           values.shape)
  within, beyond = values[inside], values[~inside]
  if not within.size or not beyond.size:
    return None
  if not ((within == within.flat[0]).all() and
          (beyond == beyond.flat[0]).all()):
    return None
  return _Band(within.flat[0], beyond.flat[0])


@register(*[p for p in elementwise.ELEMENTWISE if p is not P.select_n_p],
          history=True)
def elementwise_rule(e):
  """Elementwise ops on scores: position by position, so causal; the future
  record follows the op."""
  h = _history_axes(e)
  region = _future_region(e.out_avals[0].shape, h.axis, h.key_axis, h.window)
  futures = [_operand_future(e, i, region) for i in range(len(e.in_kinds))]
  futures = [EXACT if f == "row" else f for f in futures]
  future = _additive_mask(e, h, futures, region)
  if future is None:
    future = _combine_future(e, futures)
  return _history_pointwise(e, h, future)


def _additive_mask(e, h, futures, region):
  """``scores + bias`` with a constant bias below NEG_THRESHOLD at every
  future key: LOW, once the bias is checked as a select's mask is (every row
  keeps a key; the window it proves). None when the equation is not that."""
  if e.primitive.name != "add":
    return None
  for scores, bias in ((0, 1), (1, 0)):
    # an unscanned operand's future is a float or EXACT, never NEG itself
    if futures[scores] is TAINTED_FINITE and e.in_kinds[bias] is UNSCANNED \
        and _is_neg(futures[bias]):
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


@register(P.select_n_p, history=True)
def select_rule(e):
  """``jnp.where(mask, scores, fill)``: the mask must be known at conversion
  time; where it picks at a future key, the picked case must be exact there.
  Picking one constant at every future key makes the scores exact. Also
  records the window the mask proves (keys older than w picked as fill)."""
  h = _history_axes(e)
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
  return _history_pointwise(e, h, future)


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
  region = _future_region(shape, h.axis, h.key_axis, h.window)
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
    f = _operand_future(e, case, region)
    if _is_tainted(f):
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
        same = value == f if not _is_neg(f) else value <= NEG_THRESHOLD
        fill_like |= (choice == case - 1) & same
    picked.append(EXACT if f == "row" else f)
  future = _picked_future(picked)
  if future is NEG:
    _refuse_empty_rows(e, h, fill_like, full)
  window = None
  if h.window is None and (future is NEG or isinstance(future, float)):
    window = _proven_window(h, fill_like, full)
  return future, window


def _kept(h, fill_like, shape):
  """Where the mask keeps a past or present key (j <= i) that is not fill."""
  rows, keys = _rows_keys(shape, h.axis, h.key_axis)
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


def _picked_future(picked):
  if not picked:
    return EXACT
  if all(isinstance(f, float) for f in picked) and len(set(picked)) == 1:
    return _as_marker(picked[0])
  if all(_is_neg(f) for f in picked):
    return NEG
  return EXACT


def _proven_window(h, fill_like, shape):
  """The smallest w with every key j <= i - w picked as fill, or None when
  that is the whole sequence."""
  rows, keys = _rows_keys(shape, h.axis, h.key_axis)
  distance = np.broadcast_to(rows - keys, shape)[_kept(h, fill_like, shape)]
  window = int(distance.max()) + 1 if distance.size else 1
  return window if window < shape[h.key_axis] else None


# -- structure and reductions on scores ---------------------------------------
@register(P.broadcast_in_dim_p, P.reshape_p, P.transpose_p, P.squeeze_p,
          history=True)
def structural_rule(e):
  """Moves the rows and the key axis; causal when both stay whole axes."""
  h = e.in_kinds[0]
  name = e.primitive.name
  ndim = e.in_avals[0].ndim
  if name == "broadcast_in_dim":
    new = [e.params["broadcast_dimensions"][a] for a in (h.axis, h.key_axis)]
  elif name == "transpose":
    new = [list(e.params["permutation"]).index(a) for a in (h.axis,
                                                           h.key_axis)]
  elif name == "squeeze":
    dims = [d % ndim for d in e.params["dimensions"]]
    if h.axis in dims or h.key_axis in dims:
      raise e.refuse("it squeezes away an axis of the attention scores")
    new = [a - sum(d < a for d in dims) for a in (h.axis, h.key_axis)]
  else:
    new = [structural.reshape_out_axis(e.in_avals[0].shape, a,
                                       e.out_avals[0].shape)
           for a in (h.axis, h.key_axis)]
    if None in new or e.params.get("dimensions") is not None:
      raise e.refuse("it reshapes attention scores across their query or "
                     "key axis")
  axis, key_axis = new
  key = {"broadcast_in_dim": "shape", "reshape": "new_sizes"}.get(name)

  def resize(params, n):
    return dict(params, **{key: with_size(params[key], axis, n)})
  out = h.replace(axis=axis, key_axis=key_axis)
  return pointwise(e, [h.axis] + [None] * (len(e.in_avals) - 1), [axis],
                   resize if key else None, out_kinds=[out])


@register(P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p,
          P.argmax_p, P.argmin_p, history=True)
def reduce_rule(e):
  """Over the key axis: causal when the rows are exact (a proven mask came
  first); the result is scanned. Over other axes: still scores."""
  h = e.in_kinds[0]
  ndim = e.in_avals[0].ndim
  axes = [d % ndim for d in e.params["axes"]]
  name = e.primitive.name
  if h.axis in axes:
    raise e.refuse(f"{name} reduces over the query positions of attention "
                   "scores")
  new_axis = h.axis - sum(d < h.axis for d in axes)
  if h.key_axis in axes:
    if _is_tainted(h.future):
      raise e.refuse(
          f"{name} reduces over every position of the sequence (the keys of "
          "q·kᵀ) and no causal mask removes the future positions first")
    if h.future is LOW and name not in ("reduce_max", "argmax"):
      raise e.refuse(
          f"{name} over the keys of scores masked by addition: their future "
          "entries are large and negative in both modes but not equal, so "
          "only a maximum (softmax's) may be taken over them")
    if h.window is not None and not (
        (name == "reduce_max" and h.future in (NEG, LOW)) or
        (name == "reduce_sum" and h.future == 0.0)):
      raise e.refuse(f"{name} over a window's ring of keys would miss the "
                     "positions outside the window")
    return pointwise(e, [h.axis], [new_axis])
  new_key = h.key_axis - sum(d < h.key_axis for d in axes)
  if _is_tainted(h.future):
    future = h.future if name == "reduce_sum" else TAINTED
  elif h.future is LOW:
    future = LOW if name == "reduce_max" else TAINTED
  else:
    future = h.future if h.future == 0.0 and name == "reduce_sum" else EXACT
  out = h.replace(axis=new_axis, key_axis=new_key, future=future)
  return pointwise(e, [h.axis], [new_axis], out_kinds=[out])


@register(P.jit_p, P.closed_call_p, P.custom_jvp_call_p, P.custom_vjp_call_p,
          P.remat_p, history=True)
def call_rule(e):
  """Calls on scores convert their body (``jnp.where`` is a jit)."""
  return calls.call_rule(e)


def convert_with_windows(convert):
  """Converts twice when a mask proved a sliding window: ``convert(context)``
  first records the windows, then builds rings of that size, checked again
  against the keys outside the window. Falls back to full buffers when that
  second check fails."""
  context = {}
  converted = convert(context)
  if not context.get("windows"):
    return converted
  try:
    rings = convert({"rings": context["windows"]})
  except ScanConversionError:
    return converted
  # scores as an output are rows over all L keys, which a ring does not hold
  if any(isinstance(k, History) for k in rings.out_kinds):
    return converted
  return rings
