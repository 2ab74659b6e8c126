"""One delay state per distinct value: a shift read at its source.

A value running ``a`` elements ahead meets one that does not, so the
interpreter delays it (:class:`scanagram.interpreter.DelayLine`). When it is
a pointwise function of a *shift* of some value x (``jnp.pad(x[:-d],
((d, 0), ...))``, ``jnp.pad(x, ...)[:T]``), the delayed value is that
function of x's past: x's last d elements and the block. A width-4
convolution written as shifted sums (Griffin's ``Conv1D``: ``x * w3 +
shift(x, 1) * w2 + shift(x, 2) * w1 + shift(x, 3) * w0``) then keeps one
:class:`Past` of x of 3 elements, shared by the three terms, instead of
delay lines of 1 + 2 + 3 elements of the three products.
"""
from typing import Any, NamedTuple, Optional

import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

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
      shape = list(x.shape)
      shape[self.axis] = self.size
      queue = jnp.zeros(shape, x.dtype)
    window = lax.concatenate([queue.astype(x.dtype), x], self.axis)
    consumed = ctx.real(self.length, self.ahead)
    if isinstance(consumed, int):
      queue = lax.slice_in_dim(window, consumed, consumed + self.size,
                               axis=self.axis)
    else:
      queue = lax.dynamic_slice_in_dim(window, consumed, self.size, self.axis)
    return queue, window


class SourceDelay(NamedTuple):
  """Operand ``index`` of an equation, ``delay`` elements ahead of the
  others, recomputed from its source's :class:`Past`: ``chain`` are the
  equations from the source ``source`` to the operand (program order),
  ``shift`` the pad equation among them."""
  source: Any
  past: Past
  key: Any
  delay: int
  chain: tuple
  shift: Any
  reads: tuple     # the chain's unscanned operands (variables)
  size: int        # the operand's length along time

  def value(self, ctx, window, read, least: int):
    """The operand's elements in this block, delayed to ``least``, from the
    past's ``window``; ``read(var)`` gives an unscanned operand's block."""
    axis, past = self.past.axis, self.past
    first, n = ctx.span(self.size, least)
    x = lax.slice_in_dim(window, past.size - self.delay,
                         past.size - self.delay + n, axis=axis)
    shape = [n if d == axis else 1 for d in range(x.ndim)]
    before = (first - self.delay + jnp.arange(n) < 0).reshape(shape)
    env = {self.source: x}
    for eqn in self.chain:
      ins = []
      for a in eqn.invars:
        if isinstance(a, jex_core.Literal):
          ins.append(a.val)
        elif a in env:
          ins.append(env[a])
        else:
          ins.append(read(a, n))
      if eqn is self.shift:   # the shift itself: its fill before position d
        out = jnp.where(before, jnp.asarray(ins[1], ins[0].dtype), ins[0])
      elif eqn.primitive.name == "slice":   # a cut at the end: no-op here
        out = ins[0]
      else:
        out = eqn.primitive.bind(
            *ins, **eqn.primitive.get_bind_params(eqn.params))
      env[eqn.outvars[0]] = out
    return env[self.chain[-1].outvars[0]]


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


def _in_chain(eqn, j, kinds, axis, uniform_along, elementwise) -> bool:
  """Whether ``eqn`` (scanned operand ``j``) may stand between a source and
  the delayed operand: a shift, a cut at the end, or an elementwise
  operation with unscanned operands the same at every position."""
  config = _padding(eqn)
  if config is not None:
    lo, hi, interior = config[axis]
    return j == 0 and not interior and lo > 0 and hi <= 0 and all(
        tuple(c) == (0, 0, 0) for d, c in enumerate(config) if d != axis)
  if _is_cut(eqn, axis):
    return True
  if eqn.primitive not in elementwise:
    return False
  shape = eqn.outvars[0].aval.shape
  for a, k in zip(eqn.invars, kinds):
    if isinstance(a, jex_core.Literal) or not a.aval.shape:
      continue
    if k is not UNSCANNED:
      if a.aval.shape != shape:
        return False
    elif a.aval.shape[axis] != 1 and (a.aval.shape != shape or
                                      not uniform_along(a, axis)):
      return False
  return True


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


def source_delay(e, i: int, least: int, elementwise, uniform_along) -> Optional[
    SourceDelay]:
  """Operand ``i`` of ``e`` (running ahead of ``least``) as a pointwise
  function of one shift of a value running ``least`` ahead, or None.

  Pointwise: elementwise operations whose other operands are unscanned and
  the same at every position (``uniform_along``: weights broadcast along
  time); the shift: one ``pad`` along time with ``lo > 0`` and ``hi <= 0``,
  and slices that cut the end."""
  var, kind = e.eqn.invars[i], e.in_kinds[i]
  axis = kind.axis
  chain, shift = [], None
  while True:
    made = e.made_from(var)
    if made is None:
      break
    eqn, kinds = made
    scanned = [j for j, k in enumerate(kinds) if k is not UNSCANNED]
    if len(scanned) != 1 or len(eqn.outvars) != 1:
      break
    j = scanned[0]
    if shift is not None and not _is_cut(eqn, axis):
      break   # past the shift, only cuts at the end lead on to the source
    if kinds[j].axis != axis or not _in_chain(eqn, j, kinds, axis,
                                              uniform_along, elementwise):
      return None
    if _padding(eqn) is not None:
      shift = eqn
    chain.append(eqn)
    var, kind_of_var = eqn.invars[j], kinds[j]
  if shift is None or kind_of_var.ahead != least:
    return None
  delay = kind.ahead - least
  if _padding(shift)[axis][0] != delay:
    return None
  source = var
  same = e.value_key(source)
  key = ("past", same, least)   # (Eqn.first_to_share: who keeps it)
  new = Past(axis, source.aval.shape[axis], least)
  past = new if e.shares is None else e.shares.setdefault(
      ("past object", same, least), new)
  past.size = max(past.size, delay)
  chain = tuple(reversed(chain))
  reads = tuple(a for eqn in chain for a in eqn.invars
                if not isinstance(a, jex_core.Literal) and a is not source
                and a not in {q.outvars[0] for q in chain})
  return SourceDelay(source, past, key, delay, chain, shift, reads,
                     e.in_avals[i].shape[axis])
