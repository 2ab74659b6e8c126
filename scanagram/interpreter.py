"""The interpreter: converts a jaxpr, equation by equation, into prefill and step.

It knows no particular primitive. At conversion time it gives every variable a
kind (:mod:`scanagram.kinds`) and asks the rule registered for each equation's
primitive (``RULES``) how to run that equation in the two modes:

* prefill (``Prefill(P)``): the prompt's first P elements at once; returns the
  state each stateful equation needs to continue, and the outputs so far;
* step (``Step(t)``): one element at position t, the time axis kept at size 1;
  takes and returns that state.

Equations whose inputs are all unscanned run unchanged in both modes.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
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
class Prefill:
  """Prefill mode: the first ``length`` elements of the sequence at once."""
  length: int
  is_step = False

  def block(self, size: int, ahead: int):
    """(start, n) of the elements of a value with ``size`` elements along time,
    running ``ahead``, that this mode computes."""
    return 0, max(0, min(self.length + ahead, size))


@dataclasses.dataclass(frozen=True)
class Step:
  """Step mode: the element at ``position`` (a traced int32 scalar)."""
  position: Any
  is_step = True

  def block(self, size: int, ahead: int):
    return self.position + ahead, 1


def time_block(ctx, x, axis: int, ahead: int = 0):
  """The part of an unscanned array ``x`` along ``axis`` that lines up with
  the elements of a scanned value running ``ahead`` in mode ``ctx``."""
  start, n = ctx.block(x.shape[axis], ahead)
  if ctx.is_step:
    return lax.dynamic_slice_in_dim(x, start, 1, axis)
  return lax.slice_in_dim(x, 0, n, axis=axis)


class Converted(NamedTuple):
  """What a rule returns: the output kinds and how to run in each mode.

  ``prefill(ctx, invals) -> (state, outvals)`` and
  ``step(ctx, state, invals) -> (state, outvals)``; ``state`` is ``None`` for
  stateless equations.
  """
  out_kinds: Sequence[Any]
  prefill: Callable
  step: Callable
  stateful: bool


def stateless(out_kinds, apply) -> Converted:
  """A Converted for an equation that needs no state: ``apply(ctx, invals)``."""
  return Converted(
      tuple(out_kinds),
      lambda ctx, ins: (None, apply(ctx, ins)),
      lambda ctx, state, ins: (state, apply(ctx, ins)),
      stateful=False)


def bind(eqn, invals, params=None):
  """Runs ``eqn``'s primitive on ``invals``, with ``params`` if given."""
  params = eqn.params if params is None else params
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
  return list(out) if eqn.primitive.multiple_results else [out]


RULES: dict = {}
HISTORY_RULES: dict = {}  # for equations with a History input (attention)


def register(*primitives, history: bool = False):
  """Registers the decorated function as the rule for ``primitives``
  (with ``history=True``: for equations that have a History input).

  A rule takes an :class:`Eqn` and returns a :class:`Converted`, or raises
  ``eqn.refuse(why)`` when the primitive is not causal the way it is used.
  """
  table = HISTORY_RULES if history else RULES

  def decorate(rule):
    for p in primitives:
      table[p] = rule
    return rule
  return decorate


class Eqn:
  """What a rule sees of one equation: its primitive, params, input kinds,
  abstract values, values known at conversion time, and how to refuse."""

  def __init__(self, eqn, in_kinds, known_value, enclosing=(), context=None,
               read=None):
    self.eqn = eqn
    # whether each output is read later (by an equation or as an output of
    # the jaxpr); without the information, every one is
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

  def known_thunks(self):
    return [lambda v=v: self._known_value(v) for v in self.eqn.invars]

  def convert(self, closed_jaxpr, in_kinds, in_known=None) -> "ConvertedJaxpr":
    """Converts a sub-jaxpr (the body of a call, scan, cond...)."""
    return ConvertedJaxpr(closed_jaxpr.jaxpr, closed_jaxpr.consts, in_kinds,
                          in_known, self.enclosing + (self.eqn,),
                          self.context)


class ConvertedJaxpr:
  """A jaxpr converted for given input kinds: ``out_kinds``, ``prefill`` and
  ``step``. Its state is a dict from equation names to each stateful
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
      converted = rule(Eqn(eqn, in_kinds, self.known_value, self.enclosing,
                           self.context, self._read))
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
  def prefill(self, ctx: Prefill, invals):
    env = self._start_env(invals)
    state = {}
    for eqn, converted, name in self.entries:
      ins = [_read(env, a) for a in eqn.invars]
      if converted is None:
        outs = bind(eqn, ins)
      else:
        s, outs = converted.prefill(ctx, ins)
        if name is not None:
          state[name] = s
      _write(env, eqn.outvars, outs)
    return state, [_read(env, v) for v in self.jaxpr.outvars]

  def step(self, ctx: Step, state, invals):
    env = self._start_env(invals)
    state, new_state = state or {}, {}
    for eqn, converted, name in self.entries:
      ins = [_read(env, a) for a in eqn.invars]
      if converted is None:
        outs = bind(eqn, ins)
      else:
        s, outs = converted.step(ctx, state.get(name), ins)
        if name is not None:
          new_state[name] = s
      _write(env, eqn.outvars, outs)
    return new_state, [_read(env, v) for v in self.jaxpr.outvars]

  @property
  def stateful(self) -> bool:
    return any(name is not None for _, _, name in self.entries)

  def _start_env(self, invals):
    env = dict(zip(self.jaxpr.constvars, self.consts))
    env.update(zip(self.jaxpr.invars, invals))
    return env


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
    "Prefill", "Step", "time_block", "Converted", "stateless", "bind",
    "RULES", "register", "Eqn", "ConvertedJaxpr", "Scanned", "UNSCANNED",
    "is_scanned",
]
