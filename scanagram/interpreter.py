"""The interpreter: converts a jaxpr, equation by equation, into one block mode.

It knows no particular primitive. At conversion time it gives every variable a
kind (:mod:`scanagram.kinds`) and asks the rule registered for each equation's
primitive (``RULES``) how to run that equation on a :class:`Block`: advance
the state by k elements from the current position. Prefill is a block from
the empty state, a step a block of one.

The interpreter owns what every rule would otherwise repeat: operands that
run ahead by different amounts are delayed to the least (``DelayLine``), so a
rule sees one ``ahead``. Equations whose inputs are all unscanned run
unchanged.
"""
import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from scanagram.errors import ScanConversionError, refusal
from scanagram.kinds import (UNSCANNED, WHOLE_SEQUENCE, History, Scanned,
                             is_scanned)

# Evaluating a constant mask at conversion time is cheap; a constant bigger
# than this is not a mask and is left to run time.
_MAX_KNOWN_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Block:
  """The mode: advance the state by ``size`` elements from ``start``.

  Attributes:
    start: the position of the block's first element (int32 scalar; 0 when
      ``fresh``). With rows, each row's own (the block runs under vmap).
    size: k, static. A scanned value running ``ahead`` holds its elements
      ``start + ahead .. start + ahead + k - 1`` (see :meth:`span`).
    count: None when all k elements are real; else an int32 scalar in
      ``[0, k]``: only the first ``count`` are (a right-padded row), and the
      state advances by ``count``.
    fresh: the state before the block is the empty one: rules make their
      initial state (they get ``state=None``), and values running ahead hold
      their leading elements too (those depend on no input).
  """
  start: Any
  size: int
  count: Any = None
  fresh: bool = False

  def span(self, size: int, ahead: int):
    """``(first, n)``: the elements a value with ``size`` elements along time,
    running ``ahead``, holds in this block (in a fresh block its first ones,
    as many as exist)."""
    if self.fresh:
      return 0, max(0, min(self.size + ahead, size))
    return self.start + ahead, self.size

  def real(self, size: int, ahead: int):
    """How many of the elements in :meth:`span` are real: the state after
    the block has consumed exactly these."""
    _, n = self.span(size, ahead)
    if self.count is None:
      return n
    if self.fresh:
      return jnp.minimum(self.count + ahead, n)
    return self.count

  @property
  def advanced(self):
    """How far the position moves."""
    return self.size if self.count is None else self.count

  @property
  def is_step(self) -> bool:
    return self.size == 1 and not self.fresh


# -- what the state needs of the example length L ----------------------------
_LENGTH_USES = contextvars.ContextVar("length_uses", default=None)


def needs_length(why: str):
  """Records, while a block is traced, that it reads something of length L
  (a buffer, a position table): such a state cannot serve positions >= L."""
  uses = _LENGTH_USES.get()
  if uses is not None:
    uses.append(why)


@contextlib.contextmanager
def recording_length_uses():
  uses = []
  token = _LENGTH_USES.set(uses)
  try:
    yield uses
  finally:
    _LENGTH_USES.reset(token)


def time_block(ctx: Block, x, axis: int, ahead: int = 0,
               uniform: bool = False):
  """The part of an unscanned array ``x`` along ``axis`` (a full-length
  position table, mask or bias) that lines up with the elements a scanned
  value running ``ahead`` holds in block ``ctx``. Elements past the end are
  clamped to the last one; such positions are past L, whose outputs the
  caller turns to NaN. ``uniform``: ``x`` is the same at every position
  (a parameter broadcast along time), so any of its elements serves and
  the state does not need L for it."""
  size = x.shape[axis]
  first, n = ctx.span(size, ahead)
  if uniform:
    one = lax.slice_in_dim(x, 0, 1, axis=axis)
    return jnp.broadcast_to(one, x.shape[:axis] + (n,) + x.shape[axis + 1:])
  needs_length(f"an unscanned array of length {size} along time")
  if ctx.fresh and n <= size:
    return lax.slice_in_dim(x, 0, n, axis=axis)
  if n == 1:
    return lax.dynamic_slice_in_dim(x, first, 1, axis)
  # dynamic_slice would shift the whole block back at the end
  return jnp.take(x, jnp.clip(first + jnp.arange(n), 0, size - 1), axis=axis)


class DelayLine:
  """Delays a scanned value by ``delay`` elements (from ``ahead + delay`` down
  to ``ahead``): its state is the ``delay`` elements computed but not yet
  due."""

  def __init__(self, axis: int, size: int, ahead: int, delay: int):
    self.axis, self.size, self.ahead, self.delay = axis, size, ahead, delay

  def advance(self, ctx: Block, queue, x):
    """``(queue, due)``: ``due`` holds the elements of ``ahead``'s span."""
    if ctx.fresh:
      # x holds elements 0 .. n_in - 1 (n_in <= k + ahead + delay)
      _, n = ctx.span(self.size, self.ahead)
      joined, start = x, 0
    else:
      joined = lax.concatenate([queue, x], self.axis)
      n, start = ctx.size, 0
    due = lax.slice_in_dim(joined, 0, n, axis=self.axis)
    consumed = ctx.real(self.size, self.ahead)
    missing = self.delay + n - joined.shape[self.axis]
    if missing > 0:  # past the end of the sequence: never reaches an output
      widths = [(0, 0)] * joined.ndim
      widths[self.axis] = (0, missing)
      joined = jnp.pad(joined, widths)
    if isinstance(consumed, int):
      queue = lax.slice_in_dim(joined, start + consumed,
                               start + consumed + self.delay, axis=self.axis)
    else:
      queue = lax.dynamic_slice_in_dim(joined, consumed, self.delay,
                                       self.axis)
    return queue, due


class Converted(NamedTuple):
  """What a rule returns: the output kinds and how to run a block.

  ``advance(ctx, state, invals) -> (state, outvals)``; ``state`` is None when
  ``ctx.fresh`` (the rule makes its initial state) and for stateless
  equations. ``blocks=False``: the rule runs only fresh blocks and blocks of
  one; longer blocks on an existing state then run as a scan of steps.
  """
  out_kinds: Sequence[Any]
  advance: Callable
  stateful: bool
  blocks: bool = True


def stateless(out_kinds, apply) -> Converted:
  """A Converted for an equation that needs no state: ``apply(ctx, invals)``."""
  return Converted(tuple(out_kinds),
                   lambda ctx, state, ins: (state, apply(ctx, ins)),
                   stateful=False)


def bind(eqn, invals, params=None):
  """Runs ``eqn``'s primitive on ``invals``, with ``params`` if given."""
  params = eqn.params if params is None else params
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
  return list(out) if eqn.primitive.multiple_results else [out]


RULES: dict = {}
HISTORY_RULES: dict = {}  # for equations with a History input (attention)
_UNALIGNED: set = set()   # rules that line up their operands themselves
# primitives that act element by element (rules/elementwise fills it): a
# function of values uniform along an axis is uniform along it
ELEMENTWISE_PRIMITIVES: set = set()


def register(*primitives, history: bool = False, aligned: bool = True):
  """Registers the decorated function as the rule for ``primitives``
  (with ``history=True``: for equations that have a History input).

  A rule takes an :class:`Eqn` and returns a :class:`Converted`, or raises
  ``eqn.refuse(why)`` when the primitive is not causal the way it is used.
  With ``aligned`` (the default) the interpreter first delays operands that
  run ahead to the least-ahead one, so the rule sees one ``ahead``.
  """
  table = HISTORY_RULES if history else RULES

  def decorate(rule):
    for p in primitives:
      table[p] = rule
    if not aligned:
      _UNALIGNED.add(rule)
    return rule
  return decorate


def _aligned(rule, e: "Eqn"):
  """Runs ``rule`` on ``e`` with its operands delayed to one ``ahead``; the
  delay lines' queues join the equation's state."""
  aheads = [k.ahead for k in e.in_kinds if k is not UNSCANNED]
  least = min(aheads)
  if rule in _UNALIGNED or len(set(aheads)) == 1:
    return rule(e)
  lines = {i: DelayLine(k.axis, e.in_avals[i].shape[k.axis], least,
                        k.ahead - least)
           for i, k in enumerate(e.in_kinds)
           if k is not UNSCANNED and k.ahead > least}
  e.in_kinds = tuple(
      k if i not in lines else dataclasses.replace(k, ahead=least)
      for i, k in enumerate(e.in_kinds))
  converted = rule(e)

  def advance(ctx, state, ins):
    queues, inner = state if state is not None else ({}, None)
    ins, new = list(ins), {}
    for i, line in lines.items():
      new[i], ins[i] = line.advance(ctx, queues.get(i), ins[i])
    inner, outs = converted.advance(ctx, inner, ins)
    return (new, inner), outs
  return converted._replace(advance=advance, stateful=True)


class Eqn:
  """What a rule sees of one equation: its primitive, params, input kinds,
  abstract values, values known at conversion time, and how to refuse."""

  def __init__(self, eqn, in_kinds, known_value, enclosing=(), context=None,
               read=None, uniform_along=None):
    self.eqn = eqn
    # whether each output is read later (by an equation or as an output of
    # the jaxpr); without the information, every one is
    self._uniform_along = uniform_along
    self.outputs_read = tuple(
        not isinstance(v, jex_core.DropVar) and (read is None or v in read)
        for v in eqn.outvars)
    self.context = {} if context is None else context
    self.enclosing = tuple(enclosing)
    self.primitive = eqn.primitive
    self.params = eqn.params
    self.in_kinds = tuple(in_kinds)
    self.in_avals = tuple(v.aval for v in eqn.invars)
    self.out_avals = tuple(v.aval for v in eqn.outvars)
    self._known_value = known_value

  def refuse(self, why: str) -> ScanConversionError:
    """The error to raise: ``raise e.refuse("reduce_sum sums over ...")``."""
    return refusal(self.eqn, why, self.enclosing)

  def known(self, i: int) -> Optional[np.ndarray]:
    """Input ``i``'s value if it is a constant known at conversion time."""
    return self._known_value(self.eqn.invars[i])

  def uniform(self, i: int, axis: int) -> bool:
    """Whether unscanned input ``i`` is the same at every index along
    ``axis`` (a parameter broadcast along time)."""
    return bool(self._uniform_along and
                self._uniform_along(self.eqn.invars[i], axis))

  def known_thunks(self):
    return [lambda v=v: self._known_value(v) for v in self.eqn.invars]

  def convert(self, closed_jaxpr, in_kinds, in_known=None) -> "ConvertedJaxpr":
    """Converts a sub-jaxpr (the body of a call, scan, cond...)."""
    return ConvertedJaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, in_kinds,
                          in_known, self.enclosing + (self.eqn,),
                          self.context)


class ConvertedJaxpr:
  """A jaxpr converted for given input kinds: ``out_kinds`` and ``advance``.
  Its state is a dict from equation names to each stateful
  equation's state, in program order."""

  def __init__(self, jaxpr, consts, in_kinds, in_known=None, enclosing=(),
               context=None):
    self.jaxpr = jaxpr
    # shared by the whole conversion, nested jaxprs included: rules that
    # learn something downstream (a proven attention window) record it here
    self.context = {} if context is None else context
    self.enclosing = tuple(enclosing)
    self.consts = list(consts)
    self.in_known = list(in_known) if in_known else [lambda: None] * len(
        jaxpr.invars)
    kinds = {}
    self._producer = {}
    self._known = {v: np.asarray(c) for v, c in zip(jaxpr.constvars, consts)
                   if _is_array(c)}
    for v in jaxpr.constvars:
      kinds[v] = UNSCANNED
    for v, k in zip(jaxpr.invars, in_kinds):
      kinds[v] = k
    self._invar_known = dict(zip(jaxpr.invars, self.in_known))
    self.entries = []
    self._read = {v for eqn in jaxpr.eqns for v in eqn.invars
                  if not isinstance(v, jex_core.Literal)}
    self._read.update(v for v in jaxpr.outvars
                      if not isinstance(v, jex_core.Literal))
    for index, eqn in enumerate(jaxpr.eqns):
      in_kinds_eqn = [_kind_of(kinds, a) for a in eqn.invars]
      if not any(map(is_scanned_or_history, in_kinds_eqn)):
        out_kinds = [UNSCANNED] * len(eqn.outvars)
        self.entries.append((eqn, None, None))
        for v in eqn.outvars:
          self._producer[v] = eqn
      else:
        converted = self._convert_eqn(eqn, in_kinds_eqn)
        out_kinds = converted.out_kinds
        name = f"{index}_{eqn.primitive.name}" if converted.stateful else None
        self.entries.append((eqn, converted, name))
        # what keeps state or shifts the sequence, innermost first (the
        # batch-axes check refuses both along rows)
        ahead = max([getattr(k, "ahead", 0) for k in out_kinds] + [0])
        if converted.stateful or ahead:
          self.context.setdefault("carries_or_shifts", []).append(
              (eqn, self.enclosing))
        self.context["max_ahead"] = max(ahead,
                                        self.context.get("max_ahead", 0))
      for v, k in zip(eqn.outvars, out_kinds):
        kinds[v] = k
    self.kinds = kinds
    self.out_kinds = tuple(_kind_of(kinds, v) for v in jaxpr.outvars)

  def _convert_eqn(self, eqn, in_kinds):
    if WHOLE_SEQUENCE in in_kinds:
      raise self._refusal(
          eqn, "it uses the final carry of a scan along the scanned axis, "
          "which depends on the whole sequence")
    if any(isinstance(k, History) for k in in_kinds):
      rule = HISTORY_RULES.get(eqn.primitive)
      if rule is None:
        raise self._refusal(
            eqn, f"scanagram has no rule for `{eqn.primitive.name}` applied to "
            "attention scores (values over every position of the sequence)")
    else:
      rule = RULES.get(eqn.primitive)
    if rule is None:
      raise self._refusal(
          eqn, f"scanagram has no rule for `{eqn.primitive.name}` applied to "
          "a value that depends on the scanned input")
    try:
      converted = _aligned(rule, Eqn(eqn, in_kinds, self.known_value,
                                     self.enclosing, self.context,
                                     self._read, self.uniform_along))
    except ScanConversionError:
      raise
    except Exception as err:  # a rule bug must still name the user's line
      raise self._refusal(
          eqn, f"the rule failed with {type(err).__name__}: {err}") from err
    if len(converted.out_kinds) != len(eqn.outvars):
      raise self._refusal(eqn, "the rule returned the wrong number of outputs")
    return converted

  def _refusal(self, eqn, why):
    return refusal(eqn, why, self.enclosing)

  def uniform_along(self, var, axis: int) -> bool:
    """Whether unscanned ``var`` is the same at every index along ``axis``:
    broadcast along it, or an elementwise function of such values."""
    if isinstance(var, jex_core.Literal) or not var.aval.shape:
      return True
    eqn = self._producer.get(var)
    if eqn is None:
      return False
    if eqn.primitive.name == "broadcast_in_dim":
      dims = list(eqn.params["broadcast_dimensions"])
      if axis not in dims:
        return True
      source = dims.index(axis)
      return (eqn.invars[0].aval.shape[source] == 1 or
              self.uniform_along(eqn.invars[0], source))
    if eqn.primitive in ELEMENTWISE_PRIMITIVES:
      shape = var.aval.shape
      return all(
          isinstance(a, jex_core.Literal) or not a.aval.shape or (
              a.aval.shape == shape and self.uniform_along(a, axis))
          for a in eqn.invars)
    return False

  # -- values known at conversion time (masks, position tables) -------------
  def known_value(self, var):
    """The concrete value of an unscanned ``var`` that depends on no input of
    the function, or None."""
    if isinstance(var, jex_core.Literal):
      return np.asarray(var.val)
    if var in self._known:
      return self._known[var]
    if var in self._invar_known:
      value = self._invar_known[var]()
    elif var in self._producer:
      value = self._evaluate_known(self._producer[var], var)
    else:
      value = None
    self._known[var] = value
    return value

  def _evaluate_known(self, eqn, var):
    if any(np.prod(v.aval.shape, dtype=np.int64) > _MAX_KNOWN_ELEMENTS
           for v in eqn.outvars if hasattr(v.aval, "shape")):
      return None
    if eqn.effects:
      return None
    ins = [self.known_value(a) for a in eqn.invars]
    if any(x is None for x in ins):
      return None
    try:
      with jax.ensure_compile_time_eval():
        outs = bind(eqn, ins)
    except Exception:  # not evaluable eagerly: treat as unknown
      return None
    for v, o in zip(eqn.outvars, outs):
      self._known[v] = np.asarray(o)
    return self._known[var]

  # -- running ---------------------------------------------------------------
  def advance(self, ctx: Block, state, invals):
    """``(state, outvals)`` after block ``ctx``; ``state`` is None when
    ``ctx.fresh``."""
    env = dict(zip(self.jaxpr.constvars, self.consts))
    env.update(zip(self.jaxpr.invars, invals))
    state, new_state = state or {}, {}
    for eqn, converted, name in self.entries:
      ins = [_read(env, a) for a in eqn.invars]
      if converted is None:
        outs = bind(eqn, ins)
      else:
        s, outs = converted.advance(ctx, state.get(name), ins)
        if name is not None:
          new_state[name] = s
      _write(env, eqn.outvars, outs)
    return new_state, [_read(env, v) for v in self.jaxpr.outvars]

  @property
  def stateful(self) -> bool:
    return any(name is not None for _, _, name in self.entries)

  @property
  def blocks(self) -> bool:
    """Whether every equation runs blocks longer than one on a state."""
    return all(c is None or c.blocks for _, c, _ in self.entries)


def is_scanned_or_history(kind) -> bool:
  return kind is not UNSCANNED


def _is_array(x):
  return isinstance(x, (np.ndarray, np.generic, jax.Array, int, float, bool))


def _kind_of(kinds, atom):
  if isinstance(atom, jex_core.Literal):
    return UNSCANNED
  return kinds[atom]


def _read(env, atom):
  if isinstance(atom, jex_core.Literal):
    return atom.val
  return env[atom]


def _write(env, outvars, values):
  for v, x in zip(outvars, values):
    if not isinstance(v, jex_core.DropVar):
      env[v] = x


__all__ = [
    "Block", "DelayLine", "needs_length", "time_block", "Converted", "stateless", "bind",
    "RULES", "register", "Eqn", "ConvertedJaxpr", "Scanned", "UNSCANNED",
    "is_scanned",
]
