"""The interpreter: converts a jaxpr, equation by equation, into one block mode.

It knows no particular primitive. At conversion time it gives every variable a
kind (:mod:`scanagram.kinds`) and asks the rule registered for each equation's
primitive (``RULES``) how to run that equation on a :class:`Block`: advance
the state by k elements from the current position. Prefill is a block from
the empty state, a step a block of one.

The interpreter owns what every rule would otherwise repeat: operands that
run ahead by different amounts are delayed to the least (one
:class:`scanagram.pasts.Past` per value), so a rule sees one ``ahead``. Equations whose inputs are all unscanned run
unchanged in the fresh block; in later blocks, what took real work on data
(an encoder) is read from the state instead (:class:`_Plan`), and
broadcasts, iotas and masks that rules read through :func:`time_block` are
built only at the block's positions (:class:`Deferred`).

Rules that learn something downstream that an earlier equation needs (a
mask proves a window, so the keys need only a ring) record it on the
:class:`Conversion`; :func:`convert_learning` converts again with it.
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

from scanagram import pasts, placement, symbolic
from scanagram.errors import ScanConversionError, refusal
from scanagram.kinds import (UNSCANNED, WHOLE_SEQUENCE, History, Scanned,
                             is_scanned)

# A constant evaluated concretely at conversion time has at most this many
# elements; masks made from iota are kept symbolic (scanagram.symbolic) at
# any size.
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


_BLOCK_VALUES = contextvars.ContextVar("block_values")


def block_values() -> dict:
  """Values one equation computes for the block being traced and others of
  the same jaxpr read (see :meth:`Eqn.first_to_share`)."""
  return _BLOCK_VALUES.get()


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
  if isinstance(x, Deferred) and ctx.fresh:
    x = x.full()
  if uniform:
    one = part_along(x, axis, slice(0, 1))
    return jnp.broadcast_to(one, x.shape[:axis] + (n,) + x.shape[axis + 1:])
  needs_length(f"an unscanned array of length {size} along time")
  if isinstance(x, Deferred):   # a block on a state: computes only its part
    return x.part(axis, jnp.clip(first + jnp.arange(n), 0, size - 1))
  if ctx.fresh and n <= size:
    return lax.slice_in_dim(x, 0, n, axis=axis)
  if n == 1:
    return lax.dynamic_slice_in_dim(x, first, 1, axis)
  # dynamic_slice would shift the whole block back at the end
  return jnp.take(x, jnp.clip(first + jnp.arange(n), 0, size - 1), axis=axis)


def full_value(x):
  """``x``, computed whole if it is :class:`Deferred`."""
  return x.full() if isinstance(x, Deferred) else x


def part_along(x, axis: int, at):
  """The elements of ``x`` (an array or :class:`Deferred`) along ``axis`` at
  ``at``: a ``slice`` (static) or an int array of positions (in range)."""
  if isinstance(x, Deferred):
    return x.part(axis, at)
  if isinstance(at, slice):
    return lax.slice_in_dim(x, at.start, at.stop, axis=axis)
  if at.shape[0] == 1:
    return lax.dynamic_slice_in_dim(x, at[0], 1, axis)
  return jnp.take(x, at, axis=axis)


class Deferred:
  """An unscanned value that a block on a state has not computed: output
  ``index`` of ``eqn`` on ``ins`` (arrays or Deferred). :meth:`part` computes
  only the elements a block reads (see :func:`time_block`) from the parts
  of its operands along the matching axes, so a step never builds a
  full-length broadcast, mask or position table only to slice it. ``eqn``
  is one :func:`_by_position` accepts; along an axis it cannot slice, it
  computes the whole value and slices that."""

  def __init__(self, eqn, ins, index: int = 0):
    self.eqn, self.ins, self.index = eqn, list(ins), index
    aval = eqn.outvars[index].aval
    self.shape, self.dtype = tuple(aval.shape), aval.dtype
    self.ndim = len(self.shape)

  def full(self):
    return bind(self.eqn, self.ins)[self.index]   # bind makes the ins whole

  def part(self, axis: int, at):
    """:func:`part_along` of the whole value."""
    eqn, params = self.eqn, self.eqn.params
    size = self.shape[axis]
    n = at.stop - at.start if isinstance(at, slice) else at.shape[0]
    shape = self.shape[:axis] + (n,) + self.shape[axis + 1:]
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
      dims = list(params["broadcast_dimensions"])
      src = self.ins[0]
      if axis in dims and _shape(src)[dims.index(axis)] != 1:
        src = part_along(src, dims.index(axis), at)
      return bind(eqn, [src], dict(params, shape=shape))[0]
    if name == "iota":
      if params["dimension"] != axis:
        return bind(eqn, [], dict(params, shape=shape))[0]
      positions = jnp.arange(at.start, at.stop) if isinstance(
          at, slice) else at
      return lax.broadcast_in_dim(positions.astype(params["dtype"]), shape,
                                  (axis,))
    if name == "transpose":
      src = part_along(self.ins[0], params["permutation"][axis], at)
      return bind(eqn, [src])[0]
    if name == "slice":
      if params["strides"] is not None and params["strides"][axis] != 1:
        return part_along(self.full(), axis, at)
      begin = params["start_indices"][axis]
      inner = (slice(at.start + begin, at.stop + begin)
               if isinstance(at, slice) else at + begin)
      limits = list(params["limit_indices"])
      src = part_along(self.ins[0], axis, inner)
      starts = list(params["start_indices"])
      starts[axis], limits[axis] = 0, n
      return bind(eqn, [src], dict(params, start_indices=tuple(starts),
                                   limit_indices=tuple(limits)))[0]
    if name == "gather":
      batch = [d for d in range(self.ndim)
               if d not in params["dimension_numbers"].offset_dims]
      if axis in batch:   # a row of the output per row of the indices
        indices = part_along(self.ins[1], batch.index(axis), at)
        return bind(eqn, [full_value(self.ins[0]), indices])[0]
      return part_along(self.full(), axis, at)
    body = _call_body(eqn)
    if body is not None:   # the body's equations are all by position
      env = dict(zip(body.jaxpr.constvars, body.consts))
      env.update(zip(body.jaxpr.invars, self.ins))
      for inner in body.jaxpr.eqns:
        ins = [_read(env, a) for a in inner.invars]
        _write(env, inner.outvars, [Deferred(inner, ins, j)
                                    for j in range(len(inner.outvars))])
      return part_along(_read(env, body.jaxpr.outvars[self.index]), axis, at)
    # elementwise: operands of size 1 along the axis (or scalars) broadcast
    ins = [part_along(a, axis, at)
           if len(_shape(a)) == self.ndim and _shape(a)[axis] == size
           else full_value(a) for a in self.ins]
    return bind(eqn, ins)[self.index]


def _shape(x):
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _call_body(eqn):
  """The ClosedJaxpr a ``jit`` or ``closed_call`` equation runs, or None."""
  if eqn.primitive.name not in ("jit", "pjit", "closed_call"):
    return None
  body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  return body if isinstance(body, jex_core.ClosedJaxpr) else None


def _by_position(eqn) -> bool:
  """Whether :class:`Deferred` can compute a part of ``eqn``'s outputs from
  parts of its operands: a broadcast, an iota, a transpose, a slice, a
  gather (along the indices' rows), an elementwise operation or a call of
  those, without effects."""
  if eqn.effects:
    return False
  name = eqn.primitive.name
  if name in ("iota", "transpose", "slice") or (name == "broadcast_in_dim" and
                                                len(eqn.invars) == 1):
    return True
  if name == "gather":   # rows picked by indices (a table at positions)
    dims = eqn.params["dimension_numbers"]
    return not dims.operand_batching_dims
  if eqn.primitive in ELEMENTWISE_PRIMITIVES:
    shape = eqn.outvars[0].aval.shape
    return all(
        isinstance(a, jex_core.Literal) or not a.aval.shape or (
            len(a.aval.shape) == len(shape) and
            all(d in (1, s) for d, s in zip(a.aval.shape, shape)))
        for a in eqn.invars)
  body = _call_body(eqn)
  return body is not None and all(_by_position(e) for e in body.jaxpr.eqns)


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
  ``reads``: variables of the same jaxpr (from :meth:`Eqn.made_from`) whose
  block values ``advance`` gets after the equation's own inputs (a key
  buffer holds the keys before they were repeated over heads).
  """
  out_kinds: Sequence[Any]
  advance: Callable
  stateful: bool
  blocks: bool = True
  reads: Sequence[Any] = ()
  # for each input, whether a block on an existing state reads it (None:
  # every one); an unscanned value no such block reads is computed only in
  # the fresh block, and carried when a block still needs what came of it
  step_reads: Optional[Sequence[bool]] = None


def stateless(out_kinds, apply) -> Converted:
  """A Converted for an equation that needs no state: ``apply(ctx, invals)``."""
  return Converted(tuple(out_kinds),
                   lambda ctx, state, ins: (state, apply(ctx, ins)),
                   stateful=False)


def bind(eqn, invals, params=None):
  """Runs ``eqn``'s primitive on ``invals``, with ``params`` if given."""
  params = eqn.params if params is None else params
  # a Deferred value read other than through time_block is computed whole
  invals = [full_value(x) for x in invals]
  if _explicit(eqn, invals):
    invals = placement.conformed([v.aval for v in eqn.invars], invals)
    params = placement.fitted_params(eqn, params, invals)
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
  return list(out) if eqn.primitive.multiple_results else [out]


def _explicit(eqn, invals) -> bool:
  """Whether ``eqn`` or its operands are typed with explicit mesh axes."""
  return any(placement.explicit_spec(x) is not None for x in
             [v.aval for v in eqn.invars] + list(invals)
             + [eqn.params.get("sharding"), eqn.params.get("out_sharding")])


# rule per (primitive, kind class): None for equations on sequences and
# unscanned values, a kind class (History) for equations with an input of
# that kind, which only the rules for that kind know how to run
RULES: dict = {}
_UNALIGNED: set = set()   # rules that line up their operands themselves
# primitives that act element by element (rules/elementwise fills it): a
# function of values uniform along an axis is uniform along it
ELEMENTWISE_PRIMITIVES: set = set()


def register(*primitives, kind: Optional[type] = None, aligned: bool = True):
  """Registers the decorated function as the rule for ``primitives``
  (with ``kind``: for equations that have an input of that kind class).

  A rule takes an :class:`Eqn` and returns a :class:`Converted`, or raises
  ``eqn.refuse(why)`` when the primitive is not causal the way it is used.
  With ``aligned`` (the default) the interpreter first delays operands that
  run ahead to the least-ahead one, so the rule sees one ``ahead``.
  """
  def decorate(rule):
    for p in primitives:
      RULES[p, kind] = rule
    if not aligned:
      _UNALIGNED.add(rule)
    return rule
  return decorate


def rule_for(primitive, in_kinds):
  """The rule for an equation with ``in_kinds``, or None."""
  special = {type(k) for k in in_kinds
             if k is not UNSCANNED and not is_scanned(k)}
  if len(special) > 1:
    return None
  return RULES.get((primitive, special.pop() if special else None))


class Learner:
  """A rule family that learns, while converting, facts that another
  conversion needs (attention learns which window a mask proves, and which
  products to convert with their operands swapped). :func:`convert_learning`
  converts again with them.

  Subclasses define ``initial`` (the facts of a first conversion), ``notes``
  (what its rules record in one conversion; rules reach it through
  ``e.conversion.notes(learner)``) and the decisions below."""
  initial: Any = None

  def notes(self, facts):
    """A fresh record for one conversion given ``facts``."""
    raise NotImplementedError

  def after_refusal(self, notes):
    """New facts to convert with after a refusal, or None."""
    return None

  def improvement(self, notes):
    """After a successful conversion: facts for a better one, or None."""
    return None

  def keeps(self, converted) -> bool:
    """Whether the improved conversion replaces the first."""
    return True


LEARNERS: list = []


def learner(cls):
  """Registers a :class:`Learner` class (the decorator returns its one
  instance)."""
  instance = cls()
  LEARNERS.append(instance)
  return instance


class Conversion:
  """What every equation of one conversion shares, nested jaxprs included.

  Attributes:
    rows: the blocks run under ``vmap`` over rows (``batch_axes``); rules
      may lay their state out for it.
    carries_or_shifts: (equation, enclosing) of everything that keeps state
      or shifts the sequence, innermost first.
    max_ahead: the most any value runs ahead of the input.
  """

  def __init__(self, facts=None, rows: bool = False):
    self.rows = rows
    self.carries_or_shifts = []
    self.max_ahead = 0
    self._facts = dict(facts or {})
    self._notes = {}

  def facts(self, of: Learner):
    return self._facts.get(of, of.initial)

  def notes(self, of: Learner):
    """``of``'s record for this conversion."""
    if of not in self._notes:
      self._notes[of] = of.notes(self.facts(of))
    return self._notes[of]


def convert_learning(convert: Callable[[Conversion], Any], rows=False):
  """``convert(conversion)``, again with what each :class:`Learner` learned:
  after a refusal, with the facts a learner asks for (the first refusal
  stands when none asks for new ones); after a success, with each learner's
  improvement, kept when it converts and the learner keeps it."""
  facts, first_error = {}, None
  while True:
    conversion = Conversion(facts, rows)
    try:
      converted = convert(conversion)
      break
    except ScanConversionError as err:
      first_error = first_error or err
      retry = {of: new for of in LEARNERS
               for new in [of.after_refusal(conversion.notes(of))]
               if new is not None and new != conversion.facts(of)}
      if not retry:
        raise first_error from None
      facts.update(retry)
  for of in LEARNERS:
    better = of.improvement(conversion.notes(of))
    if better is None:
      continue
    trial = {**facts, of: better}
    try:
      improved = convert(Conversion(trial, rows))
    except ScanConversionError:
      continue
    if of.keeps(improved):
      converted, facts = improved, trial
  return converted


def _aligned(rule, e: "Eqn"):
  """Runs ``rule`` on ``e`` with its operands delayed to one ``ahead``, read
  from one :class:`scanagram.pasts.Past` per value (shared by every
  equation of the jaxpr that delays it, sized by the longest delay). An
  operand that is a pointwise function of a shift is recomputed from its
  source's past instead. The pasts' queues join the equation's state."""
  aheads = [k.ahead for k in e.in_kinds if k is not UNSCANNED]
  least = min(aheads)
  if rule in _UNALIGNED or len(set(aheads)) == 1:
    return rule(e)
  sources, kept = {}, {}   # kept: past key -> its state name
  for i, k in enumerate(e.in_kinds):
    if k is UNSCANNED or k.ahead == least:
      continue
    source = pasts.source_delay(e, i, least, ELEMENTWISE_PRIMITIVES,
                                e.uniform_along_var)
    if source is None:
      source = pasts.plain_delay(e, i, least)
    sources[i] = source
    # the first equation of the jaxpr to read a past keeps it
    if source.key not in kept and e.first_to_share(source.key):
      kept[source.key] = f"past {i}"
  e.in_kinds = tuple(
      k if i not in sources else dataclasses.replace(k, ahead=least)
      for i, k in enumerate(e.in_kinds))
  converted = rule(e)
  n_rule = len(e.eqn.invars) + len(converted.reads)
  extra = [v for s in sources.values() for v in (s.source,) + s.reads]

  def advance(ctx, state, ins):
    queues, inner = state if state is not None else ({}, None)
    values = dict(zip(extra, ins[n_rule:]))
    ins, new = list(ins[:n_rule]), {}
    for i, source in sources.items():
      scratch = block_values()
      name = kept.get(source.key)
      if name is not None and source.key not in scratch:
        new[name], scratch[source.key] = source.past.advance(
            ctx, queues.get(name), values[source.source])

      def read(var, n=None, positions=None, axis=source.past.axis):
        x = values[var]
        if n is None:
          return full_value(x)
        if not jnp.ndim(x):
          return x
        if positions is None:   # the same at every position
          one = part_along(x, axis, slice(0, 1))
          return jnp.broadcast_to(one, x.shape[:axis] + (n,) +
                                  x.shape[axis + 1:])
        size = x.shape[axis]
        needs_length(f"an unscanned array of length {size} along time")
        return part_along(x, axis, jnp.clip(positions, 0, size - 1))
      ins[i] = source.value(ctx, scratch[source.key], read, least)
    inner, outs = converted.advance(ctx, inner, ins)
    return (new, inner), outs
  return converted._replace(
      advance=advance, stateful=bool(kept or converted.stateful),
      reads=tuple(converted.reads) + tuple(extra))


# structural equations that make a view of their operand (Eqn.value_key)
_VIEWS = frozenset(["broadcast_in_dim", "reshape", "squeeze", "transpose",
                    "convert_element_type", "copy"])


class Eqn:
  """What a rule sees of one equation: its primitive, params, input kinds,
  abstract values, values known at conversion time, and how to refuse."""

  shares = None   # the jaxpr's Eqn.first_to_share record

  def __init__(self, eqn, in_kinds, known_value, enclosing=(), conversion=None,
               read=None, uniform_along=None, made_from=None, data=None,
               once=False):
    self.eqn = eqn
    # which inputs depend on data (see ConvertedJaxpr), whether sub-jaxprs
    # may compute values once, and the inputs the rule reads only through
    # time_block (a Deferred value may stand for them in a block on a state)
    self._data = data
    self.once = once
    self.block_reads = set()
    # whether each output is read later (by an equation or as an output of
    # the jaxpr); without the information, every one is
    self._uniform_along = uniform_along
    self.outputs_read = tuple(
        not isinstance(v, jex_core.DropVar) and (read is None or v in read)
        for v in eqn.outvars)
    self.conversion = Conversion() if conversion is None else conversion
    self.enclosing = tuple(enclosing)
    self.primitive = eqn.primitive
    self.params = eqn.params
    self.in_kinds = tuple(in_kinds)
    self.in_avals = tuple(v.aval for v in eqn.invars)
    self.out_avals = tuple(v.aval for v in eqn.outvars)
    self._known_value = known_value
    self._made_from = made_from

  def refuse(self, why: str) -> ScanConversionError:
    """The error to raise: ``raise e.refuse("reduce_sum sums over ...")``."""
    return refusal(self.eqn, why, self.enclosing)

  def known(self, i: int) -> Optional[np.ndarray]:
    """Input ``i``'s value if it is a constant known at conversion time."""
    return self._known_value(self.eqn.invars[i])

  def uniform(self, i: int, axis: int) -> bool:
    """Whether unscanned input ``i`` is the same at every index along
    ``axis`` (a parameter broadcast along time).

    Asking is a promise: the rule reads input ``i`` only through
    ``time_block(ctx, x, axis, ahead, uniform=<the answer>)`` (see
    :meth:`reads_by_block`)."""
    self.reads_by_block(i)
    return bool(self._uniform_along and
                self._uniform_along(self.eqn.invars[i], axis))

  def uniform_along_var(self, var, axis: int) -> bool:
    """:meth:`uniform` for any unscanned variable of the jaxpr."""
    return bool(self._uniform_along and self._uniform_along(var, axis))

  def value_key(self, var):
    """A key equal for variables that hold the same value: the variable, or
    for a view made by a structural equation (``x[None]`` in each of two
    calls), that equation and its operands' keys."""
    made = self.made_from(var)
    if made is None or made[0].primitive.name not in _VIEWS:
      return var
    eqn = made[0]
    try:
      params = tuple(sorted((k, v) for k, v in eqn.params.items()))
      hash(params)
    except TypeError:
      return var
    return (eqn.primitive.name, params,
            tuple(a.val if isinstance(a, jex_core.Literal) else
                  self.value_key(a) for a in eqn.invars))

  def first_to_share(self, key) -> bool:
    """Whether this equation is the first of its jaxpr to keep the state
    ``key`` names (a buffer of one value): later equations with the same
    key keep none and read the first one's values for the block from
    :func:`block_values`."""
    if self.shares is None:
      return True
    return self.shares.setdefault(key, self.eqn) is self.eqn

  def made_from(self, var):
    """``(eqn, in_kinds)`` of the equation of this jaxpr that computed
    ``var`` (an input of this equation or one found through this method),
    or None for an input of the jaxpr, a constant or a literal."""
    if self._made_from is None or isinstance(var, jex_core.Literal):
      return None
    return self._made_from(var)

  def reads_by_block(self, i: int):
    """Declares that in blocks on a state the rule reads unscanned input
    ``i`` only through :func:`time_block` (or hands it to a sub-jaxpr that
    does): the interpreter may then pass a :class:`Deferred` value, of which
    time_block computes only the block's part."""
    self.block_reads.add(i)

  def data(self, i: int) -> bool:
    """Whether input ``i`` depends on a data input (not on parameters and
    constants alone): a value computed from it with real work is carried."""
    return True if self._data is None else self._data(self.eqn.invars[i])

  def known_thunks(self):
    return [lambda v=v: self._known_value(v) for v in self.eqn.invars]

  def convert(self, closed_jaxpr, in_kinds, in_known=None, in_data=None,
              once=True) -> "ConvertedJaxpr":
    """Converts a sub-jaxpr (the body of a call, scan, cond...).

    ``in_data``: for each of its inputs, whether it depends on data (default:
    every one does); ``once=False`` when the sub-jaxpr runs more than once
    per block with one state (a while loop's body): it then computes its
    unscanned values in every block."""
    return ConvertedJaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, in_kinds,
                          in_known, self.enclosing + (self.eqn,),
                          self.conversion, in_data, once and self.once)


class ConvertedJaxpr:
  """A jaxpr converted for given input kinds: ``out_kinds`` and ``advance``.
  Its state is a dict from equation names to each stateful
  equation's state, in program order."""

  def __init__(self, jaxpr, consts, in_kinds, in_known=None, enclosing=(),
               conversion=None, in_data=None, once=True):
    self.jaxpr = jaxpr
    self.once = once
    self.conversion = Conversion() if conversion is None else conversion
    self.enclosing = tuple(enclosing)
    self.consts = list(consts)
    self.in_known = list(in_known) if in_known else [lambda: None] * len(
        jaxpr.invars)
    kinds = self.kinds_so_far = {}
    self._producer = {}
    self._made_by = {}   # every variable an equation computed -> that one
    self._shares = {}    # Eqn.first_to_share: state key -> its keeper
    self._known = {}
    # constants are fetched only when a rule asks for their value (a mask)
    self._const_known = {v: c for v, c in zip(jaxpr.constvars, consts)
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
    self._data = _data_flags(jaxpr, in_data)
    self._block_reads = {}   # id(eqn) -> inputs its rule reads by block
    for index, eqn in enumerate(jaxpr.eqns):
      in_kinds_eqn = [_kind_of(kinds, a) for a in eqn.invars]
      if not any(map(is_scanned_or_history, in_kinds_eqn)):
        out_kinds = [UNSCANNED] * len(eqn.outvars)
        self.entries.append((eqn, None, None))
        for v in eqn.outvars:
          self._producer[v] = eqn
      else:
        try:
          converted = self._convert_eqn(eqn, in_kinds_eqn)
        except ScanConversionError as err:
          # for scanagram.explain: the kinds found before the refusal (the
          # outermost jaxpr's, which sees the error last)
          err.partial = (jaxpr, dict(kinds), eqn)
          raise
        out_kinds = converted.out_kinds
        name = f"{index}_{eqn.primitive.name}" if converted.stateful else None
        self.entries.append((eqn, converted, name))
        # what keeps state or shifts the sequence, innermost first (the
        # batch-axes check refuses both along rows)
        ahead = max([getattr(k, "ahead", 0) for k in out_kinds] + [0])
        if converted.stateful or ahead:
          self.conversion.carries_or_shifts.append((eqn, self.enclosing))
        self.conversion.max_ahead = max(ahead, self.conversion.max_ahead)
      for v, k in zip(eqn.outvars, out_kinds):
        kinds[v] = k
        self._made_by[v] = eqn
    self.kinds = kinds
    self.out_kinds = tuple(_kind_of(kinds, v) for v in jaxpr.outvars)
    self._plan = _Plan(self)

  def _convert_eqn(self, eqn, in_kinds):
    if WHOLE_SEQUENCE in in_kinds:
      raise self._refusal(
          eqn, "it uses the final carry of a scan along the scanned axis, "
          "which depends on the whole sequence")
    rule = rule_for(eqn.primitive, in_kinds)
    if rule is None and any(isinstance(k, History) for k in in_kinds):
      raise self._refusal(
          eqn, f"scanagram has no rule for `{eqn.primitive.name}` applied to "
          "attention scores (values over every position of the sequence)")
    if rule is None:
      raise self._refusal(
          eqn, f"scanagram has no rule for `{eqn.primitive.name}` applied to "
          "a value that depends on the scanned input. If it is a kernel or a "
          "call the conversion cannot look into, decorate the function that "
          "makes it with @scanagram.convert_as(reference), reference being "
          "plain JAX that computes the same; or give its step with "
          "scanagram.custom_scanagram")
    e = Eqn(eqn, in_kinds, self.known_value, self.enclosing, self.conversion,
            self._read, self.uniform_along, self._made_from, self._is_data,
            self.once)
    self._block_reads[id(eqn)] = e.block_reads
    e.shares = self._shares
    try:
      converted = _aligned(rule, e)
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

  def _made_from(self, var):
    eqn = self._made_by.get(var)
    if eqn is None:
      return None
    return eqn, tuple(_kind_of(self.kinds_so_far, a) for a in eqn.invars)

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
    """The value of an unscanned ``var`` if it depends on no input of the
    function: a concrete array, a :class:`scanagram.symbolic.Lazy` (a
    function of its indices, such as a mask made from ``iota``: it
    materialises on ``np.asarray``) or a
    :class:`scanagram.symbolic.Unavailable` saying why it cannot be known
    (too large, side effects). None when it depends on an input."""
    if isinstance(var, jex_core.Literal):
      return np.asarray(var.val)
    if var in self._known:
      return self._known[var]
    if var in self._const_known:
      value = _fetched(self._const_known[var])
    elif var in self._invar_known:
      value = self._invar_known[var]()
    elif var in self._producer:
      value = self._evaluate_known(self._producer[var], var)
    else:
      value = None
    self._known[var] = value
    return value

  def _evaluate_known(self, eqn, var):
    if eqn.effects:
      return symbolic.Unavailable(
          f"`{eqn.primitive.name}` has side effects")
    ins = [self.known_value(a) for a in eqn.invars]
    if any(x is None for x in ins):
      return None
    # lazily where it keeps a function of the indices (no L×L mask is
    # built); anything else concretely, up to _MAX_KNOWN_ELEMENTS
    outs = symbolic.evaluate(eqn, ins, ELEMENTWISE_PRIMITIVES,
                             _MAX_KNOWN_ELEMENTS)
    for v, o in zip(eqn.outvars, outs):
      self._known[v] = o
    return self._known[var]

  # -- running ---------------------------------------------------------------
  def advance(self, ctx: Block, state, invals):
    """``(state, outvals)`` after block ``ctx``; ``state`` is None when
    ``ctx.fresh``."""
    token = _BLOCK_VALUES.set({})
    try:
      return self._advance(ctx, state, invals)
    finally:
      _BLOCK_VALUES.reset(token)

  def _advance(self, ctx, state, invals):
    env = dict(zip(self.jaxpr.constvars, self.consts))
    env.update(zip(self.jaxpr.invars, invals))
    state, new_state = state or {}, {}
    plan, fresh = self._plan, ctx.fresh
    for index, (eqn, converted, name) in enumerate(self.entries):
      if converted is None and not fresh and index not in plan.run:
        # computed in the fresh block: later blocks read what it carried
        for v, key, perm in plan.carried_by.get(index, ()):
          new_state[key] = state[key]
          env[v] = _unpermuted(state[key], perm)
        continue
      if converted is not None and not fresh:
        reads = plan.step_reads[index]
        ins = [_read(env, a) if reads[i] else None
               for i, a in enumerate(eqn.invars)]
      else:
        ins = [_read(env, a) for a in eqn.invars]
      if converted is not None and converted.reads:
        ins += [env[v] for v in converted.reads]
      if converted is None and not fresh and index in plan.lazy:
        outs = [Deferred(eqn, ins, j) for j in range(len(eqn.outvars))]
      elif converted is None:
        outs = bind(eqn, ins)
        for v, key, perm in plan.carried_by.get(index, ()):
          j = eqn.outvars.index(v)
          if fresh:
            new_state[key] = outs[j] if perm is None else jnp.transpose(
                outs[j], perm)
          else:   # (the equation runs for another output)
            new_state[key] = state[key]
            outs[j] = _unpermuted(state[key], perm)
      else:
        s, outs = converted.advance(ctx, state.get(name), ins)
        if name is not None:
          new_state[name] = s
      _write(env, eqn.outvars, outs)
    return new_state, [_read(env, v) for v in self.jaxpr.outvars]

  @property
  def stateful(self) -> bool:
    return bool(self._plan.carried_by) or any(
        name is not None for _, _, name in self.entries)

  @property
  def step_reads(self) -> tuple:
    """For each input, whether a block on a state reads it."""
    return self._plan.invar_reads

  @property
  def lazy_invars(self) -> tuple:
    """For each input, whether a block on a state reads it only through
    :func:`time_block` (a :class:`Deferred` value may stand for it)."""
    return self._plan.lazy_invars

  def _is_data(self, var) -> bool:
    if isinstance(var, jex_core.Literal):
      return False
    return self._data.get(var, True)

  @property
  def blocks(self) -> bool:
    """Whether every equation runs blocks longer than one on a state."""
    return all(c is None or c.blocks for _, c, _ in self.entries)


# primitives whose result takes real work: a value they compute from data is
# carried from the fresh block rather than recomputed in every block
_REAL_WORK = frozenset("""
dot_general conv_general_dilated reduce_sum reduce_max reduce_min
reduce_prod reduce_and reduce_or reduce_xor reduce argmax argmin cumsum
cumprod cummax cummin cumlogsumexp sort top_k approx_top_k scan while fft
cholesky eig eigh lu qr svd triangular_solve schur hessenberg tridiagonal
tridiagonal_solve householder_product custom_linear_solve reduce_window_sum
reduce_window_max reduce_window_min reduce_window select_and_scatter_add
select_and_gather_add
""".split())


def _takes_real_work(eqn) -> bool:
  """A contraction, convolution, reduction, loop, cumulative op, sort... or
  a call, cond or custom derivative whose body has one."""
  if eqn.primitive.name in _REAL_WORK:
    return True
  return any(_takes_real_work(inner) for body in _sub_jaxprs(eqn)
             for inner in body.eqns)


def _sub_jaxprs(eqn):
  for param in eqn.params.values():
    for x in param if isinstance(param, (list, tuple)) else [param]:
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def _data_flags(jaxpr, in_data):
  """``var -> bool``: whether each variable depends on a data input
  (``in_data``; by default every input is data), not on constants or
  parameters alone."""
  if in_data is None:
    in_data = [True] * len(jaxpr.invars)
  data = {v: False for v in jaxpr.constvars}
  data.update((v, bool(d)) for v, d in zip(jaxpr.invars, in_data))
  for eqn in jaxpr.eqns:
    d = any(data.get(a, True) for a in eqn.invars
            if not isinstance(a, jex_core.Literal))
    data.update((v, d) for v in eqn.outvars)
  return data


class _Plan:
  """What a block on a state (not fresh) runs of a jaxpr's unscanned
  equations.

  Every block gets the unscanned inputs the fresh block got (parameters, an
  encoder's source), so an unscanned value is the same in every block. One
  that takes real work (:func:`_takes_real_work`) on data (an encoder's
  output, the cross-attention keys computed from it) is computed once, in
  the fresh block, and carried (``carried_by``: equation index -> ``[(var,
  state key)]``) when later blocks read it or a cheap function of it no
  larger than it; the equations that only feed carried values do not run
  (``run``: the unscanned equations that do). Values of parameters and
  constants alone are recomputed: with rows (batch_axes) a carried one would
  be copied per row, and a parameter or a view of one costs nothing.
  ``lazy``: the equations run as :class:`Deferred` (every reader takes its
  block's part through time_block). ``step_reads``: per converted
  equation, the inputs a later block reads; ``invar_reads``,
  ``lazy_invars``: the same for the jaxpr's inputs.
  """

  def __init__(self, cj):
    entries, kinds, jaxpr = cj.entries, cj.kinds, cj.jaxpr
    unscanned = [i for i, (_, c, _) in enumerate(entries) if c is None]
    producer = {v: i for i in unscanned for v in entries[i][0].outvars}

    def variables(atoms):
      return [a for a in atoms if not isinstance(a, jex_core.Literal)]

    heavy = {}
    for i in unscanned:
      eqn = entries[i][0]
      h = any(heavy.get(a, False) for a in variables(eqn.invars)) or (
          _takes_real_work(eqn) and any(map(cj._is_data, eqn.invars)))
      heavy.update((v, h) for v in eqn.outvars)

    # what blocks on a state read: converted equations' inputs, the outputs
    self.step_reads, roots = {}, []
    users = {}   # var -> its readers in such blocks

    def use(v, user):
      users.setdefault(v, []).append(user)
    for i, (eqn, converted, _) in enumerate(entries):
      if converted is None:
        if eqn.effects:   # a callback runs in every block
          roots.extend(variables(eqn.invars))
        continue
      reads = converted.step_reads
      if reads is None or not cj.once:
        reads = [True] * len(eqn.invars)
      # (a sequence is always passed on: its delay line reads it)
      reads = self.step_reads[i] = tuple(
          bool(r) or _kind_of(kinds, a) is not UNSCANNED
          for r, a in zip(reads, eqn.invars))
      for j, a in enumerate(eqn.invars):
        if reads[j] and not isinstance(a, jex_core.Literal):
          roots.append(a)
          use(a, ("rule", i, j))
      for v in getattr(converted, "reads", ()):
        roots.append(v)
        use(v, ("other",))
    for v in variables(jaxpr.outvars):
      roots.append(v)
      use(v, ("other",))

    self.carried_by, carried = {}, set()
    if not cj.once:
      self.run = set(unscanned)
    else:
      self.run = {i for i in unscanned if entries[i][0].effects}
      seen = set()
      while roots:
        v = roots.pop()
        if v in seen or v not in producer:
          continue
        seen.add(v)
        i = producer[v]
        eqn = entries[i][0]
        if heavy[v] and (_takes_real_work(eqn) or sum(
            _size(a) for a in variables(eqn.invars) if heavy.get(a)) >=
                         _size(v)):
          j = eqn.outvars.index(v)
          key = f"{i}_{eqn.primitive.name}" + (
              f"_{j}" if len(eqn.outvars) > 1 else "")
          self.carried_by.setdefault(i, []).append([v, key, None])
          carried.add(v)
          continue
        if i not in self.run:
          self.run.add(i)
          roots.extend(variables(eqn.invars))
    for i in self.run:
      for a in variables(entries[i][0].invars):
        use(a, ("eqn", i))
    for carried_here in self.carried_by.values():
      for entry in carried_here:
        entry[2] = _carried_layout(entry[0], users.get(entry[0], ()),
                                   entries)

    # in program order backwards: readers are decided before their operands
    self.lazy = set()

    def by_block(v):
      return v not in carried and all(
          (u[0] == "rule" and u[2] in cj._block_reads[id(entries[u[1]][0])])
          or (u[0] == "eqn" and u[1] in self.lazy)
          for u in users.get(v, ()))
    for i in sorted(self.run, reverse=True):
      eqn = entries[i][0]
      if _by_position(eqn) and all(by_block(v) for v in eqn.outvars):
        self.lazy.add(i)
    self.invar_reads = tuple(not cj.once or v in users or
                             kinds[v] is not UNSCANNED for v in jaxpr.invars)
    self.lazy_invars = tuple(v in users and by_block(v)
                             for v in jaxpr.invars)


def _carried_layout(var, users, entries):
  """The permutation to carry ``var`` in: with the batch axes first when
  every block on a state reads it as an operand of the same contraction
  (cross-attention keys ``[B, S, H, dh]`` in ``[B, H, S, dh]``), the layout
  in which XLA reads it in place; each block transposes it back, which XLA
  folds into the product instead of copying the whole array every step.
  None: as it is."""
  perms = set()
  for user in users:
    if user[0] != "rule":
      return None
    eqn = entries[user[1]][0]
    if eqn.primitive.name != "dot_general":
      return None
    _, batch = eqn.params["dimension_numbers"]
    side = user[2]
    perm = tuple(batch[side]) + tuple(d for d in range(var.aval.ndim)
                                      if d not in batch[side])
    perms.add(perm)
  if len(perms) != 1:
    return None
  perm, = perms
  return None if perm == tuple(sorted(perm)) else perm


def _unpermuted(x, perm):
  return x if perm is None else jnp.transpose(x, np.argsort(perm))


def _size(var) -> int:
  return int(np.prod(var.aval.shape, dtype=np.int64))


def is_scanned_or_history(kind) -> bool:
  return kind is not UNSCANNED


def _fetched(constant):
  """A constant's value on the host, or Unavailable for an array sharded
  across processes (this process cannot read it all)."""
  if isinstance(constant, jax.Array) and not constant.is_fully_addressable:
    return symbolic.Unavailable(
        "it is an array sharded across processes, which one process cannot "
        "read; compute it inside the function, or pass it as an argument")
  return np.asarray(constant)


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
