"""Block-wise (tiled) computation rewritten over whole axes, before conversion.

Memory-efficient attention tiles the time axis: ``reshape [L] -> [L / b, b]``,
``lax.map`` over query blocks, a ``lax.scan`` over key blocks whose carry
accumulates (a running sum of ``exp(q·k) * mask``), ``reshape`` back. The
conversion reasons about whole time axes, so :func:`untile` first rewrites
such a jaxpr into one that computes the same values over whole axes:

* an axis split into blocks is kept merged (:class:`~scanagram.untile.values.Split`): every operation
  on it runs on the merged axis, whose element ``i * b + r`` is block ``i``'s
  element ``r`` (elementwise ops, transposes, broadcasts, contractions and
  reductions over both halves);
* a ``scan`` without a carry (``lax.map``) becomes its body vmapped over the
  iterations;
* a ``scan`` whose every carry accumulates what the iteration computes
  without reading the carry (``c + f(x)``, ``max(c, f(x))``), or is a sum
  rescaled by a running maximum (the online softmax), becomes ``f``
  vmapped, reduced over the iterations; a reduction over a block's elements
  followed by one over the blocks is one reduction over the merged axis
  (:class:`~scanagram.untile.values.Pending`);
* key blocks a query block skips (a ``fori_loop`` up to the diagonal, a
  ``dynamic_slice`` around a window) are read too, when they hold only keys
  the masks remove.

Every rewrite is an identity of the values (sums are reassociated), and
whatever has no rule is computed as written, on the split layout restored
by a reshape. The conversion then proves the result causal (the masks, the
future keys contributing exactly nothing) as it does any attention.

The package: this module (the interpreter that re-traces the jaxpr),
``values`` (what it holds), ``layout`` (the rules on split values),
``loops`` (maps and scans over key blocks), ``accumulations`` (what each
carry of such a scan does) and ``skipping`` (key blocks a query block
skips).
"""
import math
from typing import Any, NamedTuple, Tuple

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram import _jax_internals, errors
from scanagram.untile import layout, loops
from scanagram.untile.values import Pending, Split, bind_plain, plain

_CALLS = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr",
          P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr",
          P.remat_p: "jaxpr"}


class _Changed:
  """Whether a rewrite happened (else the conversion keeps the original),
  and the ``(blocks, size)`` of each axis split into blocks."""
  def __init__(self):
    self.any = False
    self.splits = set()
    self.why = []   # why a block-wise part was not rewritten
    # key blocks skipped before a window: the masks must prove a window of
    # at most each of these
    self.windows = []


class Untiled(NamedTuple):
  """What :func:`untile` gives.

  Attributes:
    closed: the ClosedJaxpr rewritten over whole axes, or None when nothing
      block-wise was rewritten.
    splits: the ``(blocks, size)`` of each axis found split into blocks.
    why: why block-wise parts were left as written.
    window_at_most: key blocks were skipped before a window: the masks
      must prove a window of at most this (every key this far back from a
      query masked), or the rewrite does not hold; None when none was.
  """
  closed: Any
  splits: Tuple
  why: Tuple
  window_at_most: Any


def untile(closed) -> Untiled:
  """``closed`` (a ClosedJaxpr) rewritten over whole axes (see
  :class:`Untiled`). Only a jaxpr that splits an axis in two and loops
  (:func:`_block_wise`) is looked at; one that cannot be traced again (a
  primitive that does not bind from its parameters) is left as written."""
  changed = _Changed()
  if not _block_wise(closed.jaxpr):
    return Untiled(None, (), (), None)
  avals = [v.aval for v in closed.jaxpr.invars]

  def run(*args):
    outs = _eval(closed.jaxpr, closed.consts, args, changed)
    return [plain(o) for o in outs]
  try:
    new = jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(a.shape, a.dtype)
                                for a in avals])
  except Exception:   # noqa: BLE001  (left as written: its refusal stands)
    return Untiled(None, (), (), None)
  window = min(changed.windows, default=None)
  if not changed.any:
    return Untiled(None, (), tuple(changed.why), None)
  return Untiled(
      new.replace(jaxpr=_jax_internals.without_dead_code(new.jaxpr)),
      tuple(sorted(changed.splits)), tuple(changed.why), window)


def _block_wise(jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr inside it) splits an axis into two and
  holds a loop: what block-wise code looks like."""
  splits = loops = False
  for e, _ in _equations(jaxpr):
    if e.primitive is P.reshape_p and len(e.params["new_sizes"]) > len(
        e.invars[0].aval.shape):
      splits = True
    if e.primitive in (P.scan_p, P.while_p):
      loops = True
    if splits and loops:
      return True
  return False


def _equations(jaxpr):
  for e in jaxpr.eqns:
    yield e, jaxpr
    for param in e.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jex_core.Jaxpr):
          yield from _equations(inner)


# values known at conversion time (index arithmetic on iota) are also
# computed concretely when at most this big: a loop's bounds per block
_KNOWN_ELEMENTS = 1 << 16


def _eval(jaxpr, consts, args, changed, source=None, known_args=None):
  """Evaluates ``jaxpr`` on the interpreter's values; ``source``: the
  source of the call being inlined, for equations with no line of the
  user's (``jnp.where``'s body); ``known_args``: the arguments' values
  where known at conversion time (else None)."""
  env, known = {}, {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def read_known(v):
    return v.val if isinstance(v, jex_core.Literal) else known.get(v)

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
    if not isinstance(c, jax.core.Tracer):
      known[v] = c
  for v, a, k in zip(jaxpr.invars, args,
                     known_args or [None] * len(jaxpr.invars)):
    env[v] = a
    if k is not None:
      known[v] = k
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    known_ins = [read_known(v) for v in eqn.invars]
    info = eqn.source_info
    if source is not None and errors.user_source_line(info) is None:
      info = source
    with _jax_internals.traced_as(info):
      outs = _rewrite(eqn, ins, changed, info, known_ins)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
    if not _has_jaxpr(eqn) and all(k is not None for k in known_ins) and all(
        np.size(k) <= _KNOWN_ELEMENTS for k in known_ins) and all(
            math.prod(v.aval.shape) <= _KNOWN_ELEMENTS for v in eqn.outvars):
      with jax.ensure_compile_time_eval():
        values = eqn.primitive.bind(*known_ins, **eqn.params)
      known.update(zip(eqn.outvars, values if eqn.primitive.multiple_results
                       else [values]))
  return [read(v) for v in jaxpr.outvars]


def _has_jaxpr(eqn) -> bool:
  """Whether ``eqn`` holds a jaxpr (a call, a loop): its known values come
  from its body, not from running it."""
  return any(isinstance(getattr(p, "jaxpr", p), jex_core.Jaxpr)
             for param in eqn.params.values()
             for p in (param if isinstance(param, (list, tuple))
                       else [param]))


def _rewrite(eqn, ins, changed, info, known_ins):
  prim = eqn.primitive
  if prim in _CALLS:
    sub = eqn.params[_CALLS[prim]]
    if isinstance(sub, jex_core.ClosedJaxpr):
      return _eval(sub.jaxpr, sub.consts, ins, changed, info, known_ins)
    return _eval(sub, [], ins, changed, info, known_ins)
  if prim is P.scan_p:
    outs = loops.rewrite_scan(eqn, ins, changed, known_ins, _eval)
    if outs is not None:
      changed.any = True
      return outs
    return bind_plain(eqn, ins)
  if prim is P.reshape_p and eqn.params.get("dimensions") is None:
    return layout.reshape(ins[0], tuple(eqn.params["new_sizes"]),
                          changed.splits)
  if not any(isinstance(x, (Split, Pending)) for x in ins):
    return bind_plain(eqn, ins)
  rule = layout.rule_for(prim)
  out = rule(eqn, ins) if rule is not None else None
  return bind_plain(eqn, ins) if out is None else out


