"""Building blocks shared by the rule families.

``pointwise`` covers every primitive that acts independently at each time
position: it runs the primitive itself on the current block (the prompt in
prefill, a size-1 slice in the step), so the rule never spells out parameters
it does not interpret. ``DelayLine`` lines up values that run ahead.
"""
from typing import Callable, Optional, Sequence

from jax import lax
import jax.numpy as jnp

from scanagram.interpreter import Converted, bind, time_block
from scanagram.kinds import UNSCANNED, Scanned, is_scanned


def scanned_operands(e):
  return [i for i, k in enumerate(e.in_kinds) if is_scanned(k)]


def only_scanned(e, why_not: str):
  """Refuses unless every non-unscanned input is a plain Scanned kind."""
  for k in e.in_kinds:
    if k is not UNSCANNED and not is_scanned(k):
      raise e.refuse(why_not)


class DelayLine:
  """Delays a scanned value by ``delay`` elements (from ``ahead + delay`` down
  to ``ahead``): its state is the ``delay`` elements computed but not yet due.
  """

  def __init__(self, axis: int, size: int, ahead: int, delay: int):
    self.axis, self.size, self.ahead, self.delay = axis, size, ahead, delay

  def prefill(self, ctx, x):
    _, n = ctx.block(self.size, self.ahead)
    due = lax.slice_in_dim(x, 0, n, axis=self.axis)
    pending = lax.slice_in_dim(x, n, x.shape[self.axis], axis=self.axis)
    missing = self.delay - pending.shape[self.axis]
    if missing:  # past the end of the sequence: never reaches an output
      widths = [(0, 0)] * x.ndim
      widths[self.axis] = (0, missing)
      pending = jnp.pad(pending, widths)
    return pending, due

  def step(self, queue, x):
    joined = lax.concatenate([queue, x], self.axis)
    return (lax.slice_in_dim(joined, 1, None, axis=self.axis),
            lax.slice_in_dim(joined, 0, 1, axis=self.axis))


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

  Operands that run ahead by different amounts are delayed to the least.
  """
  scanned = [i for i, k in enumerate(e.in_kinds) if k is not UNSCANNED]
  ahead = min(e.in_kinds[i].ahead for i in scanned)
  lines = {
      i: DelayLine(operand_axes[i], e.in_avals[i].shape[operand_axes[i]], ahead,
                   e.in_kinds[i].ahead - ahead)
      for i in scanned if e.in_kinds[i].ahead > ahead
  }
  out_size = e.out_avals[0].shape[out_axes[0]]
  run = run or (lambda ctx, ins, params: bind(e.eqn, ins, params))

  def apply(ctx, ins):
    ins = list(ins)
    for i, axis in enumerate(operand_axes):
      if axis is not None and e.in_kinds[i] is UNSCANNED:
        ins[i] = time_block(ctx, ins[i], axis, ahead)
    params = e.params
    if resize is not None:
      params = resize(params, ctx.block(out_size, ahead)[1])
    return run(ctx, ins, params)

  if out_kinds is None:
    out_kinds = tuple(Scanned(a, ahead) for a in out_axes)
  if not lines:
    return Converted(out_kinds, lambda ctx, ins: (None, apply(ctx, ins)),
                     lambda ctx, state, ins: (state, apply(ctx, ins)), False)

  def prefill(ctx, ins):
    ins, queues = list(ins), {}
    for i, line in lines.items():
      queues[i], ins[i] = line.prefill(ctx, ins[i])
    return queues, apply(ctx, ins)

  def step(ctx, queues, ins):
    ins, new = list(ins), {}
    for i, line in lines.items():
      new[i], ins[i] = line.step(queues[i], ins[i])
    return new, apply(ctx, ins)

  return Converted(out_kinds, prefill, step, True)


def replaced_at(values: Sequence, i: int, value) -> tuple:
  """``values`` with entry ``i`` replaced (a per-axis parameter)."""
  values = list(values)
  values[i] = value
  return tuple(values)


def with_size(shape: Sequence[int], axis: int, n: int) -> tuple:
  shape = list(shape)
  shape[axis] = n
  return tuple(shape)


class AlignedLeaves:
  """The operands of a call-like equation (``custom_scanagram``,
  ``associative_scan``): ``n_consts`` values its function closes over, which
  must not depend on the scanned input, then leaves scanned along one axis,
  or unscanned with that axis at full length. ``prefill`` and ``step`` give
  the leaves' current block lined up to the least-ahead leaf (``ahead``)."""

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
    self.ahead = min(k.ahead for k in kinds if is_scanned(k))
    self.lines = {
        i: DelayLine(axis, avals[i].shape[axis], self.ahead,
                     k.ahead - self.ahead)
        for i, k in enumerate(kinds) if is_scanned(k) and k.ahead > self.ahead}

  def _split(self, ctx, ins):
    xs = list(ins[self.n_consts:])
    for i, k in enumerate(self.kinds):
      if k is UNSCANNED:
        xs[i] = time_block(ctx, xs[i], self.axis, self.ahead)
    return list(ins[:self.n_consts]), xs

  def prefill(self, ctx, ins):
    """``(queues, consts, leaves)`` for the prompt."""
    consts, xs = self._split(ctx, ins)
    queues = {}
    for i, line in self.lines.items():
      queues[i], xs[i] = line.prefill(ctx, xs[i])
    return queues, consts, xs

  def step(self, ctx, queues, ins):
    """``(queues, consts, leaves)`` for one step (leaves of size 1 along
    ``axis``)."""
    consts, xs = self._split(ctx, ins)
    new = {}
    for i, line in self.lines.items():
      new[i], xs[i] = line.step(queues[i], xs[i])
    return new, consts, xs


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
  ring of the last ``reach`` elements of the front-padded input, indexed by
  position modulo ``reach`` (Fast WaveNet's queues).

  ``run(ins, padding, dilation)`` binds the operation with ``padding`` and
  ``dilation`` along time replaced (``ins[0]`` is the windowed input);
  ``fill(ins)`` is the value the training mode pads with.
  """

  def __init__(self, e, axis, out_axis, reach, size, dilation, padding,
               ahead, run, fill):
    self.axis, self.out_axis = axis, out_axis
    self.reach, self.size, self.dilation = reach, size, dilation
    (self.lo, self.hi), self.ahead = padding, ahead
    self.run, self.fill = run, fill
    self.in_size = e.in_avals[0].shape[axis]
    self.out_size = e.out_avals[0].shape[out_axis]

  def converted(self):
    return Converted([Scanned(self.out_axis, self.ahead)], self.prefill,
                     self.step, True)

  def prefill(self, ctx, ins):
    x = ins[0]
    y = self.run(ins, (self.lo, max(self.hi, 0)), self.dilation)
    _, n = ctx.block(self.out_size, self.ahead)
    y = lax.slice_in_dim(y, 0, n, axis=self.out_axis)
    # the ring: the last `reach` elements of the front-padded input
    widths = [(0, 0)] * x.ndim
    widths[self.axis] = (self.lo, 0)
    padded = jnp.pad(x, widths, constant_values=self.fill(ins))
    length = padded.shape[self.axis]
    if length < self.reach:
      widths[self.axis] = (self.reach - length, 0)
      padded = jnp.pad(padded, widths, constant_values=self.fill(ins))
      length = self.reach
    last = lax.slice_in_dim(padded, length - self.reach, None, axis=self.axis)
    ring = jnp.roll(last, (length - self.reach) % self.reach, axis=self.axis)
    return ring, [y]

  def step(self, ctx, ring, ins):
    x = ins[0]
    newest = ctx.position + self.ahead + self.reach  # index in padded input
    if self.hi > 0:  # past the input's end the training mode sees padding
      x = jnp.where(newest - self.lo >= self.in_size,
                    jnp.full_like(x, self.fill(ins)), x)
    taps = []
    for j in range(self.size - 1, 0, -1):
      slot = jnp.mod(newest - j * self.dilation, self.reach)
      taps.append(lax.dynamic_slice_in_dim(ring, slot, 1, self.axis))
    taps.append(x)
    window = lax.concatenate(taps, self.axis)
    ring = lax.dynamic_update_slice_in_dim(
        ring, x, jnp.mod(newest, self.reach), self.axis)
    return ring, [self.run([window, *ins[1:]], (0, 0), 1)]
