"""The key and value buffers of attention: a buffer of the past L positions,
or a ring of the last w under a sliding window."""
import jax.numpy as jnp
from jax import lax

from scanagram.interpreter import needs_length

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


def batch_dims_first(params, avals, i):
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


def make_buffer(kind, e, i, window, params=None):
  """A buffer for operand ``i`` of the dot_general ``e``, batch axes first,
  and the equation's parameters that read that layout."""
  size = e.in_avals[i].shape[kind.axis]
  perm, params = batch_dims_first(params or e.params, e.in_avals, i)
  if window is None:
    buffer = Buffer(kind.axis, size, kind.ahead, perm)
  else:
    buffer = RingBuffer(kind.axis, size, kind.ahead, window, perm)
  return buffer, params


