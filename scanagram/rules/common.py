"""Building blocks shared by the rule families.

``pointwise`` covers every primitive that acts independently at each time
position: it runs the primitive itself on the current block, so the rule
never spells out parameters it does not interpret.
"""
from typing import Callable, Optional, Sequence

from jax import lax
import jax.numpy as jnp

from scanagram.interpreter import (Converted, bind, block_values,
                                   needs_length, stateless, time_block)
from scanagram.kinds import UNSCANNED, Scanned, is_scanned

# Refusals that end with what converts instead. A loop over time reads the
# sequence one position at a time (x[t], jnp.unstack, dynamic_slice), each
# read a separate operation the conversion cannot step through.
SCAN_INSTEAD = ("`lax.scan` over the sequence (`hk.dynamic_unroll` in "
                "Haiku), which converts to a step")
LOOP_OVER_TIME = ("If this is a loop over time (a Python loop, "
                  "`lax.fori_loop`, `hk.static_unroll`), write it as "
                  f"{SCAN_INSTEAD}")
# sort and top_k along time need the whole sequence for every output
SELECTS_OVER_TIME = (
    ", which needs every position of the sequence, later ones included. A "
    "causal alternative: a running maximum or minimum (`lax.cummax`, "
    "`lax.cummin`), or a `lax.scan` whose carry keeps the k largest elements "
    "so far, or a sorted window of the latest ones")


def scanned_operands(e):
  return [i for i, k in enumerate(e.in_kinds) if is_scanned(k)]


def only_scanned(e, why_not: str):
  """Refuses unless every non-unscanned input is a plain Scanned kind."""
  for k in e.in_kinds:
    if k is not UNSCANNED and not is_scanned(k):
      raise e.refuse(why_not)


def pointwise(e,
              operand_axes: Sequence[Optional[int]],
              out_axes: Sequence[int],
              resize: Optional[Callable[[dict, int], dict]] = None,
              run: Optional[Callable] = None,
              out_kinds: Optional[Sequence] = None) -> Converted:
  """Converts an equation that is independent at each time position.

  Args:
    e: the equation.
    operand_axes: for each operand, its axis that runs along time, or None
      (for unscanned operands: a full-length operand such as a position table
      is sliced to the current block along this axis).
    out_axes: each output's time axis.
    resize: ``resize(params, n)`` gives the params for a time extent of n, for
      primitives whose params hold shapes.
    run: ``run(ctx, ins, params) -> outs`` instead of binding the primitive.
    out_kinds: the output kinds, when not ``Scanned(out_axes[j], ahead)``
      (attention scores keep their History kind).

  The interpreter has delayed operands that run ahead to one ``ahead``.
  """
  scanned = [i for i, k in enumerate(e.in_kinds) if k is not UNSCANNED]
  ahead = e.in_kinds[scanned[0]].ahead
  out_size = e.out_avals[0].shape[out_axes[0]]
  run = run or (lambda ctx, ins, params: bind(e.eqn, ins, params))

  uniform = [axis is not None and e.in_kinds[i] is UNSCANNED and
             e.uniform(i, axis) for i, axis in enumerate(operand_axes)]

  def apply(ctx, ins):
    ins = list(ins)
    for i, axis in enumerate(operand_axes):
      if axis is not None and e.in_kinds[i] is UNSCANNED:
        ins[i] = time_block(ctx, ins[i], axis, ahead, uniform[i])
    params = e.params
    if resize is not None:
      params = resize(params, ctx.span(out_size, ahead)[1])
    return run(ctx, ins, params)

  if out_kinds is None:
    out_kinds = tuple(Scanned(a, ahead) for a in out_axes)
  return stateless(out_kinds, apply)


def replaced_at(values: Sequence, i: int, value) -> tuple:
  """``values`` with entry ``i`` replaced (a per-axis parameter)."""
  values = list(values)
  values[i] = value
  return tuple(values)


def with_size(shape: Sequence[int], axis: int, n: int) -> tuple:
  shape = list(shape)
  shape[axis] = n
  return tuple(shape)


class CallLeaves:
  """The operands of a call-like equation (``custom_scanagram``,
  ``associative_scan``): ``n_consts`` values its function closes over, which
  must not depend on the scanned input, then leaves scanned along one axis,
  or unscanned with that axis at full length. ``split`` gives the consts and
  the leaves' current block (the interpreter has aligned them to one
  ``ahead``)."""

  def __init__(self, e, n_consts: int, name: str, closes_over: str):
    self.n_consts = n_consts
    if any(k is not UNSCANNED for k in e.in_kinds[:n_consts]):
      raise e.refuse(f"{name} closes over a value that depends on the "
                     f"scanned input: {closes_over}")
    self.kinds = kinds = e.in_kinds[n_consts:]
    avals = e.in_avals[n_consts:]
    if any(k is not UNSCANNED and not is_scanned(k) for k in kinds):
      raise e.refuse(f"{name} takes attention scores or a value known only "
                     "at the end of the sequence")
    axes = sorted({k.axis for k in kinds if is_scanned(k)})
    if len(axes) != 1:
      raise e.refuse(f"the leaves of {name}'s input are scanned along "
                     f"different axes {axes}")
    self.axis = axis = axes[0]
    self.length = next(a.shape[axis] for a, k in zip(avals, kinds)
                       if is_scanned(k))
    for a, k in zip(avals, kinds):
      if k is UNSCANNED and (a.ndim <= axis or a.shape[axis] != self.length):
        raise e.refuse(f"a leaf of {name}'s input (shape {a.shape}) does not "
                       f"depend on the scanned input and has no axis {axis} "
                       f"of length {self.length}")
    self.ahead = next(k.ahead for k in kinds if is_scanned(k))

  def split(self, ctx, ins):
    """``(consts, leaves)`` for block ``ctx``."""
    xs = list(ins[self.n_consts:])
    for i, k in enumerate(self.kinds):
      if k is UNSCANNED:
        xs[i] = time_block(ctx, xs[i], self.axis, self.ahead)
    return list(ins[:self.n_consts]), xs


def last_real(ctx, y, axis, ahead, before):
  """The element of ``y`` (a value's elements in block ``ctx``) that the
  state keeps after the block: the last real one, or ``before`` when the
  block has none (size 1 along ``axis``)."""
  if not y.shape[axis]:
    return before
  real = ctx.real(y.shape[axis], ahead)   # y holds the block's span
  if isinstance(real, int):
    return lax.slice_in_dim(y, real - 1, real, axis=axis)
  last = lax.dynamic_slice_in_dim(y, jnp.maximum(real - 1, 0), 1, axis)
  return jnp.where(real > 0, last, before)


def window_ahead(e, what, axis, input_ahead, padding, reach):
  """How far ahead the output of an operation over a window along time runs
  (front padding ``lo`` minus the window's ``reach`` back, plus the input's
  own lead), or refuse when that reads the future."""
  lo, hi = padding
  ahead = input_ahead + lo - reach
  if ahead < 0:
    raise e.refuse(
        f"its padding along the scanned axis {axis} is ({lo}, {hi}) but "
        f"{what} reaches {reach} elements back: element t would need element "
        f"t + {-ahead} of the input (causal padding is ({reach}, 0))")
  return ahead


class CausalWindow:
  """An operation over a window along time (a convolution, a pooling) whose
  front padding covers the window's reach, ``(K - 1) * dilation``. State: a
  ring of the last ``ring_size >= reach`` elements of the front-padded
  input (the fill before position 0), indexed by position modulo
  ``ring_size`` (Fast WaveNet's queues).

  ``run(ins, padding, dilation)`` binds the operation with ``padding`` and
  ``dilation`` along time replaced (``ins[0]`` is the windowed input);
  ``fill(ins)`` is the value the training mode pads with.
  """

  def __init__(self, e, axis, out_axis, reach, size, dilation, padding,
               ahead, run, fill, shared_fill=None):
    self.axis, self.out_axis = axis, out_axis
    self.reach, self.size, self.dilation = reach, size, dilation
    (self.lo, self.hi), self.ahead = padding, ahead
    self.run, self.fill = run, fill
    self.in_size = e.in_avals[0].shape[axis]
    self.out_size = e.out_avals[0].shape[out_axis]
    # One ring per distinct input (a gated WaveNet's filter and gate read
    # the same one): the ring holds the same elements for every window with
    # the same input and fill (``shared_fill``, a constant).
    # (sized by the longest window: positions index the ring the same way
    # whatever the reach)
    self.key, self.keeps, self._size = None, True, [reach]
    if shared_fill is not None and e.shares is not None:
      self.key = ("ring", e.value_key(e.eqn.invars[0]), axis,
                  e.in_kinds[0].ahead, shared_fill)
      self.keeps = e.first_to_share(self.key)
      self._size = e.shares.setdefault(("ring size",) + self.key, [reach])
      self._size[0] = max(self._size[0], reach)

  @property
  def ring_size(self) -> int:
    return self._size[0]

  def converted(self):
    return Converted([Scanned(self.out_axis, self.ahead)], self.advance,
                     self.keeps)

  def advance(self, ctx, ring, ins):
    """The window's outputs for the block; the ring after it (None for a
    window that reads another's ring)."""
    if self.key is not None and not ctx.fresh:
      if self.keeps:
        block_values()[self.key] = ring
      else:
        ring = block_values()[self.key]
    ring, outs = self._advance(ctx, ring, ins)
    return (ring if self.keeps else None), outs

  def _advance(self, ctx, ring, ins):
    if self.hi > 0:  # past the input's end the training mode sees padding
      needs_length("a window padded at the end of the sequence")
    if ctx.fresh:
      return self._fresh(ctx, ins)
    if ctx.size == 1:
      return self._step(ctx, ring, ins)
    x = ins[0]
    first = ctx.start + self.ahead + self.reach  # padded index of x's first
    if self.hi > 0:
      x = self._past_end(x, first, ctx.size, ins)
    # the ring in order of position, then the block: every window is whole
    r = self.ring_size
    ordered = jnp.take(ring, jnp.mod(first - r + jnp.arange(r) - self.lo, r),
                       axis=self.axis)
    seq = lax.concatenate([ordered.astype(x.dtype), x], self.axis)
    y = self.run([lax.slice_in_dim(seq, r - self.reach, None, axis=self.axis),
                  *ins[1:]], (0, 0), self.dilation)
    return self._ring_from(seq, first - r, first + ctx.advanced), [y]

  def _fresh(self, ctx, ins):
    x = ins[0]
    y = self.run(ins, (self.lo, max(self.hi, 0)), self.dilation)
    _, n = ctx.span(self.out_size, self.ahead)
    y = lax.slice_in_dim(y, 0, n, axis=self.out_axis)
    # the front-padded input, with a ring's worth more in front so that a
    # window before the first element is whole
    widths = [(0, 0)] * x.ndim
    widths[self.axis] = (self.lo + self.ring_size, 0)
    padded = jnp.pad(x, widths, constant_values=self.fill(ins))
    consumed = ctx.real(self.in_size, self.ahead - self.lo + self.reach)
    return self._ring_from(padded, -self.ring_size, self.lo + consumed), [y]

  def _ring_from(self, seq, seq_first, end):
    """The ring after a block: the ``ring_size`` elements of ``seq`` (whose
    first element has padded index ``seq_first``) before padded index
    ``end``, the input's element at position p (padded index p + lo) in
    slot p mod ring_size, whatever the padding of the window."""
    e, r = end - seq_first, self.ring_size
    if isinstance(e, int):
      last = lax.slice_in_dim(seq, e - r, e, axis=self.axis)
    else:
      last = lax.dynamic_slice_in_dim(seq, e - r, r, self.axis)
    return jnp.take(last, jnp.mod(jnp.arange(r) - end + self.lo, r),
                    axis=self.axis)

  def _past_end(self, x, first, k, ins):
    index = first - self.lo + jnp.arange(k)   # input element of each
    shape = [k if d == self.axis else 1 for d in range(x.ndim)]
    return jnp.where((index >= self.in_size).reshape(shape),
                     jnp.full_like(x, self.fill(ins)), x)

  def _step(self, ctx, ring, ins):
    x = ins[0]
    newest = ctx.start + self.ahead + self.reach  # index in padded input
    if self.hi > 0:
      x = self._past_end(x, newest, 1, ins)
    taps = []
    for j in range(self.size - 1, 0, -1):
      slot = jnp.mod(newest - j * self.dilation - self.lo, self.ring_size)
      taps.append(lax.dynamic_slice_in_dim(ring, slot, 1, self.axis))
    taps.append(x)
    window = lax.concatenate(taps, self.axis)
    new_ring = lax.dynamic_update_slice_in_dim(
        ring, x.astype(ring.dtype), jnp.mod(newest - self.lo, self.ring_size),
        self.axis)
    if ctx.count is not None:
      new_ring = jnp.where(ctx.count > 0, new_ring, ring)
    return new_ring, [self.run([window, *ins[1:]], (0, 0), 1)]


def dot_out_axis(dims, side, axis, ndims):
  """Output axis of operand ``side``'s non-contracted ``axis``."""
  (contract, batch) = dims
  if axis in batch[side]:
    return batch[side].index(axis)
  free = [d for d in range(ndims[side])
          if d not in contract[side] and d not in batch[side]]
  offset = len(batch[0]) + (0 if side == 0 else
                            ndims[0] - len(contract[0]) - len(batch[0]))
  return offset + free.index(axis)
