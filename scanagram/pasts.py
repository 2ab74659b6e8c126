"""One delay state per distinct value: delays read from a shared past.

A value running ``a`` elements ahead meets one that does not, so the
interpreter delays it: the elements it needs are the last ``a`` of the
value's :class:`Past`, kept once per value however many equations delay it
(sized by the longest delay). When the delayed value is a pointwise
function of a *shift* of some x (``jnp.pad(x[:-d], ((d, 0), ...))``,
``concatenate([zeros, x[:-d] * mask])``, ``jnp.pad(x, ...)[:T]``) it is
recomputed from x's past instead. A width-4 convolution written as shifted
sums (Griffin's ``Conv1D``: ``x * w3 + shift(x * m1, 1) * w2 + ...`` with a
document mask m varying along time) then keeps one past of x of 3 elements,
shared by the three terms, instead of delay lines of 1 + 2 + 3 elements of
the three products.
"""
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from scanagram import placement
from scanagram.kinds import UNSCANNED


class Past:
  """The last ``size`` elements of a scanned value x (its elements from
  the block's first on are the block itself). ``size`` grows while
  readers are converted (the longest delay), before any block runs."""

  def __init__(self, axis: int, length: int, ahead: int):
    self.axis, self.length, self.ahead, self.size = axis, length, ahead, 0

  def advance(self, ctx, queue, x):
    """``(queue, window)``: ``window`` is the ``size`` elements before x's
    block (zeros before position 0) then the block."""
    if ctx.fresh:
      queue = placement.zeros_along(x, self.axis, self.size)
    window = lax.concatenate([queue.astype(x.dtype), x], self.axis)
    # the next block starts this many elements on, even where a fresh
    # block's x stopped short at the end of the value
    extra = self.ahead if ctx.fresh else 0
    moved = ctx.advanced + extra
    missing = ctx.size + extra + self.size - window.shape[self.axis]
    if missing > 0:   # past the end of the value: never reaches an output
      widths = [(0, 0)] * window.ndim
      widths[self.axis] = (0, missing)
      window = jnp.pad(window, widths)
    if isinstance(moved, int):
      queue = lax.slice_in_dim(window, moved, moved + self.size,
                               axis=self.axis)
    else:
      queue = lax.dynamic_slice_in_dim(window, moved, self.size, self.axis)
    return queue, window


class SourceDelay(NamedTuple):
  """Operand ``index`` of an equation, ``delay`` elements ahead of the
  others, read from its source's :class:`Past`: the source itself delayed
  (no ``chain``), or recomputed through ``chain``, the equations from the
  source to the operand (program order) with one ``shift`` among them (a
  pad or a concatenation after constants). ``reads`` are the chain's
  unscanned operands, ``tables`` those that vary along time (read at the
  positions of the block)."""
  source: Any
  past: Past
  key: Any
  delay: int
  chain: tuple
  shift: Any
  reads: tuple
  tables: frozenset
  size: int        # the operand's length along time

  def value(self, ctx, window, read, least: int):
    """The operand's elements in this block, delayed to ``least``, from the
    past's ``window``; ``read(var, n, positions)`` gives an unscanned
    operand at ``positions`` along time, or for None its first element
    ``n`` times (it is the same at every position); ``read(var)`` all of
    it."""
    axis, past = self.past.axis, self.past
    first, n = ctx.span(self.size, least)
    if self.shift is None:
      # a fresh block holds the source from its first element: nothing of
      # it is due later than now
      start = past.size - (0 if ctx.fresh else self.delay)
      return lax.slice_in_dim(window, start, start + n, axis=axis)
    x = lax.slice_in_dim(window, past.size - self.delay,
                         past.size - self.delay + n, axis=axis)
    positions = first + jnp.arange(n)
    shape = [n if d == axis else 1 for d in range(x.ndim)]
    before = (positions - self.delay < 0).reshape(shape)
    env, offset = {self.source: x}, self.delay   # before the shift: x's frame
    for eqn in self.chain:
      ins = []
      for a in eqn.invars:
        if isinstance(a, jex_core.Literal):
          ins.append(a.val)
        elif a in env:
          ins.append(env[a])
        elif eqn is self.shift:
          ins.append(read(a))
        else:
          ins.append(read(a, n, positions - offset if a in self.tables
                          else None))
      if eqn is self.shift:
        out = jnp.where(before, _fill(eqn, ins, axis, positions), ins[-1]
                        if eqn.primitive.name == "concatenate" else ins[0])
        offset = 0
      elif eqn.primitive.name == "slice":   # a cut at the end: no-op here
        out = ins[0]
      else:
        out = eqn.primitive.bind(
            *ins, **eqn.primitive.get_bind_params(eqn.params))
      env[eqn.outvars[0]] = out
    return env[self.chain[-1].outvars[0]]


def _fill(shift, ins, axis, positions):
  """What a shift puts before the source: a pad's value, or the constant
  operands a concatenation puts first, at ``positions``."""
  if shift.primitive.name != "concatenate":
    return jnp.asarray(ins[1], ins[0].dtype)
  front = lax.concatenate([jnp.asarray(a) for a in ins[:-1]], axis)
  index = jnp.clip(positions, 0, front.shape[axis] - 1)
  return jnp.take(front, index, axis=axis).astype(ins[-1].dtype)


def _is_cut(eqn, axis) -> bool:
  """A slice that only cuts elements at the end along ``axis``."""
  if eqn.primitive.name != "slice":
    return False
  shape = eqn.invars[0].aval.shape
  strides = eqn.params.get("strides") or (1,) * len(shape)
  return all(s == 0 for s in eqn.params["start_indices"]) and all(
      s == 1 for s in strides) and all(
          lim == n for d, (lim, n) in enumerate(
              zip(eqn.params["limit_indices"], shape)) if d != axis)


def _shift_length(eqn, j: int, axis: int) -> Optional[int]:
  """How far ``eqn`` shifts its scanned operand ``j`` along ``axis`` (a
  pad at the front, or a concatenation after unscanned operands), or None
  when it is not such a shift."""
  config = _padding(eqn)
  if config is not None:
    lo, hi, interior = config[axis]
    if j == 0 and not interior and lo > 0 and hi <= 0 and all(
        tuple(c) == (0, 0, 0) for d, c in enumerate(config) if d != axis):
      return lo
    return None
  if eqn.primitive.name == "concatenate" and eqn.params["dimension"] == axis \
      and j == len(eqn.invars) - 1 and j > 0:
    return sum(a.aval.shape[axis] for a in eqn.invars[:j])
  return None


def _pointwise_in_chain(eqn, kinds, axis, elementwise) -> Optional[set]:
  """The unscanned operands of an elementwise ``eqn`` that vary along time
  (read at the block's positions), or None when ``eqn`` may not stand in a
  chain: its scanned operand and full-length unscanned ones must have its
  shape."""
  if eqn.primitive not in elementwise:
    return None
  shape = eqn.outvars[0].aval.shape
  tables = set()
  for a, k in zip(eqn.invars, kinds):
    if isinstance(a, jex_core.Literal) or not a.aval.shape:
      continue
    if k is not UNSCANNED:
      if a.aval.shape != shape:
        return None
    elif a.aval.shape[axis] != 1:
      # lax broadcasts its size-1 axes
      if len(a.aval.shape) != len(shape) or a.aval.shape[axis] != \
          shape[axis] or any(n not in (1, m) for n, m in zip(a.aval.shape,
                                                              shape)):
        return None
      tables.add(a)
  return tables


def _padding(eqn):
  """The padding config of a ``pad``, or of a ``jit`` that only pads its
  first operand with its second (``jnp.pad``); else None."""
  if eqn.primitive.name == "pad":
    return eqn.params["padding_config"]
  if eqn.primitive.name not in ("jit", "pjit") or len(eqn.invars) != 2:
    return None
  body = eqn.params.get("jaxpr")
  if not isinstance(body, jex_core.ClosedJaxpr) or body.consts:
    return None
  *casts, pad = body.jaxpr.eqns
  if pad.primitive.name != "pad" or pad.invars[0] is not \
      body.jaxpr.invars[0] or list(pad.outvars) != list(body.jaxpr.outvars):
    return None
  fill = body.jaxpr.invars[1]
  for cast in casts:   # the fill value converted to the operand's dtype
    if cast.primitive.name != "convert_element_type" or \
        cast.invars != [fill]:
      return None
    fill = cast.outvars[0]
  if pad.invars[1] is not fill:
    return None
  return pad.params["padding_config"]


def _past_of(e, source, axis: int, ahead: int, delay: int):
  """The shared :class:`Past` of ``source`` (running ``ahead``) that serves
  a delay of ``delay``, and its key (:meth:`Eqn.first_to_share`)."""
  same = e.value_key(source)
  new = Past(axis, source.aval.shape[axis], ahead)
  past = new if e.shares is None else e.shares.setdefault(
      ("past object", same, ahead), new)
  past.size = max(past.size, delay)
  return past, ("past", same, ahead)


def plain_delay(e, i: int, least: int) -> SourceDelay:
  """Operand ``i`` of ``e`` delayed to ``least`` from its own past (shared
  by every equation that delays the same value)."""
  var, kind = e.eqn.invars[i], e.in_kinds[i]
  delay = kind.ahead - least
  past, key = _past_of(e, var, kind.axis, kind.ahead, delay)
  return SourceDelay(var, past, key, delay, (), None, (), frozenset(),
                     e.in_avals[i].shape[kind.axis])


def source_delay(e, i: int, least: int, elementwise, uniform_along) -> Optional[
    SourceDelay]:
  """Operand ``i`` of ``e`` (running ahead of ``least``) as a pointwise
  function of one shift of a value running ``least`` ahead, or None.

  Pointwise, before and after the shift: elementwise operations whose other
  operands are unscanned (weights broadcast along time, or tables such as a
  document mask, read at the block's positions); cuts at the end; the
  shift: one ``pad`` along time with ``lo > 0`` and ``hi <= 0``, or a
  concatenation after unscanned operands."""
  var, kind = e.eqn.invars[i], e.in_kinds[i]
  axis = kind.axis
  chain, shift, tables = [], None, set()
  while True:
    made = e.made_from(var)
    if made is None:
      break
    eqn, kinds = made
    scanned = [j for j, k in enumerate(kinds) if k is not UNSCANNED]
    if len(scanned) != 1 or len(eqn.outvars) != 1:
      break
    j = scanned[0]
    if kinds[j].axis != axis:
      break
    length = _shift_length(eqn, j, axis)
    if length is not None:
      if shift is not None:
        break   # a second shift: the source is the first one's output
      shift = eqn
      if length != kind.ahead - least:
        return None
    elif not _is_cut(eqn, axis):
      found = _pointwise_in_chain(eqn, kinds, axis, elementwise)
      if found is None:
        break
      tables |= {a for a in found if not uniform_along(a, axis)}
    chain.append(eqn)
    var, kind_of_var = eqn.invars[j], kinds[j]
  if shift is None or kind_of_var.ahead != least:
    return None
  # past the source: what the walk took beyond a break is not in the chain
  chain = tuple(reversed(chain))
  past, key = _past_of(e, var, axis, least, kind.ahead - least)
  made = {q.outvars[0] for q in chain}
  reads = tuple(dict.fromkeys(
      a for eqn in chain for a in eqn.invars
      if not isinstance(a, jex_core.Literal) and a is not var
      and a not in made))
  return SourceDelay(var, past, key, kind.ahead - least, chain, shift, reads,
                     frozenset(tables), e.in_avals[i].shape[axis])
