"""Block-wise (tiled) computation rewritten over whole axes, before conversion.

Memory-efficient attention tiles the time axis: ``reshape [L] -> [L / b, b]``,
``lax.map`` over query blocks, a ``lax.scan`` over key blocks whose carry
accumulates (a running sum of ``exp(q·k) * mask``), ``reshape`` back. The
conversion reasons about whole time axes, so :func:`untile` first rewrites
such a jaxpr into one that computes the same values over whole axes:

* an axis split into blocks is kept merged (:class:`Split`): every operation
  on it runs on the merged axis, whose element ``i * b + r`` is block ``i``'s
  element ``r`` (elementwise ops, transposes, broadcasts, contractions and
  reductions over both halves);
* a ``scan`` without a carry (``lax.map``) becomes its body vmapped over the
  iterations;
* a ``scan`` whose every carry accumulates what the iteration computes
  without reading the carry (``c + f(x)``, ``max(c, f(x))``) becomes ``f``
  vmapped, reduced over the iterations; a reduction over a block's elements
  followed by one over the blocks is one reduction over the merged axis
  (:class:`Pending`).

Every rewrite is an identity of the values (sums are reassociated), and
whatever has no rule is computed as written, on the split layout restored
by a reshape. The conversion then proves the result causal (the masks, the
future keys contributing exactly nothing) as it does any attention.
"""
import dataclasses
import math
from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram import _jax_internals, accumulations, errors, skipping
from scanagram.rules.elementwise import ELEMENTWISE

_ELEMENTWISE = frozenset(ELEMENTWISE)
_CALLS = {P.jit_p: "jaxpr", P.closed_call_p: "call_jaxpr",
          P.custom_jvp_call_p: "call_jaxpr", P.custom_vjp_call_p: "call_jaxpr",
          P.remat_p: "jaxpr"}
_REDUCTIONS = {P.reduce_sum_p: "sum", P.reduce_max_p: "max",
               P.reduce_min_p: "min"}
_REDUCE = {"sum": P.reduce_sum_p, "max": P.reduce_max_p,
           "min": P.reduce_min_p}


@dataclasses.dataclass(frozen=True)
class Split:
  """A value of ``shape`` whose axes ``outer`` and ``inner`` of each pair are
  one axis split into blocks, held as ``merged``: the pair merged into one
  axis where ``outer`` is, ``inner`` left out (element ``i * b + r`` is
  block ``i``, element ``r``)."""
  merged: Any
  shape: Tuple[int, ...]
  pairs: Tuple[Tuple[int, int], ...]

  @property
  def inners(self):
    return {i for _, i in self.pairs}

  def at(self, d) -> int:
    """The merged axis of original axis ``d`` (a pair's inner axis: its
    outer's)."""
    for o, i in self.pairs:
      if d == i:
        d = o
    return d - sum(i < d for i in self.inners)


@dataclasses.dataclass(frozen=True)
class Pending:
  """A value whose axis ``axis`` still has to be reduced by ``op``: after
  that reduction it is ``done`` (the reduction over a block's elements was
  taken over the merged axis). ``plain()`` computes it as written (an
  array or a Split)."""
  done: Any
  shape: Tuple[int, ...]
  axis: int
  op: str
  plain: Any


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


# -- values --------------------------------------------------------------------
def plain(x):
  """``x`` as an array of its original shape."""
  if isinstance(x, Pending):
    return plain(x.plain())
  if not isinstance(x, Split):
    return x
  return _unmerge(x, x.pairs)


def _unmerge(x: Split, pairs):
  """``x`` with ``pairs`` split back into their two axes (a Split of the
  rest, or an array)."""
  m, keep = x.merged, [p for p in x.pairs if p not in pairs]
  # split each merged axis into (blocks, elements) at its place, then move
  # the inner axes where they belong
  shape_now = list(m.shape)
  order = [None] * len(m.shape)   # merged axis -> original axes
  for d in range(len(x.shape)):
    if d in x.inners:
      continue
    order[x.at(d)] = [d]
  for o, i in pairs:
    order[x.at(o)] = [o, i]
  new_shape, axes = [], []
  for a, orig in enumerate(order):
    if len(orig) == 2:
      new_shape += [x.shape[orig[0]], x.shape[orig[1]]]
    else:
      new_shape.append(shape_now[a])
    axes += orig
  # axes of the kept pairs' inners are not in the array: place them out
  kept_inners = {i for _, i in keep}
  target = [d for d in range(len(x.shape)) if d not in kept_inners]
  m = lax.reshape(m, tuple(new_shape))
  m = lax.transpose(m, tuple(axes.index(d) for d in target))
  if not keep:
    return m
  return Split(m, x.shape, tuple(keep))


def _merge(a, shape, pairs):
  """The array ``a`` of ``shape`` with ``pairs`` merged as a Split holds
  them."""
  x = Split(None, shape, tuple(pairs))
  target = []
  for d in range(len(shape)):
    if d in x.inners:
      continue
    inner = [i for o, i in pairs if o == d]
    target += [d] + inner
  a = lax.transpose(a, tuple(target))
  merged_shape = []
  for d in range(len(shape)):
    if d in x.inners:
      continue
    inner = [i for o, i in pairs if o == d]
    merged_shape.append(shape[d] * (shape[inner[0]] if inner else 1))
  return Split(lax.reshape(a, tuple(merged_shape)), tuple(shape),
               tuple(pairs))


def _as_split(x, shape, pairs):
  """Operand ``x`` of ``shape`` (an array, a Split or a Pending) with
  exactly ``pairs`` merged."""
  if isinstance(x, Pending):
    x = x.plain()
  if isinstance(x, Split):
    extra = [p for p in x.pairs if p not in pairs]
    if extra:
      x = _unmerge(x, extra)
  if isinstance(x, Split):
    missing = [p for p in pairs if p not in x.pairs]
    if not missing:
      return x
    # the missing pairs merged in the merged array: the same layout
    inner = _merge(x.merged, tuple(x.merged.shape),
                   [(x.at(o), x.at(i)) for o, i in missing])
    return Split(inner.merged, tuple(shape), tuple(pairs))
  return _merge(x, shape, pairs)


def _wrap(merged, shape, pairs):
  return Split(merged, tuple(shape), tuple(pairs)) if pairs else merged


# -- the evaluator ---------------------------------------------------------------
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


def _bind(eqn, ins):
  outs = eqn.primitive.bind(*[plain(x) for x in ins], **eqn.params)
  return list(outs) if eqn.primitive.multiple_results else [outs]


def _rewrite(eqn, ins, changed, info, known_ins):
  prim = eqn.primitive
  if prim in _CALLS:
    sub = eqn.params[_CALLS[prim]]
    if isinstance(sub, jex_core.ClosedJaxpr):
      return _eval(sub.jaxpr, sub.consts, ins, changed, info, known_ins)
    return _eval(sub, [], ins, changed, info, known_ins)
  if prim is P.scan_p:
    outs = _scan(eqn, ins, changed, known_ins)
    if outs is not None:
      changed.any = True
      return outs
    return _bind(eqn, ins)
  if prim is P.reshape_p and eqn.params.get("dimensions") is None:
    return _reshape(ins[0], tuple(eqn.params["new_sizes"]), changed.splits)
  if not any(isinstance(x, (Split, Pending)) for x in ins):
    return _bind(eqn, ins)
  rule = _RULES.get(prim)
  if prim in _ELEMENTWISE:
    rule = _elementwise
  out = rule(eqn, ins) if rule is not None else None
  return _bind(eqn, ins) if out is None else out


def _reshape(x, new_sizes, splits=None):
  """A reshape on the merged layout: the axes are grouped so that each group
  of the input and of the output has one size; a pair is merged back into
  one axis or kept, one axis split into two (both > 1) starts a pair, other
  groups are regrouped as written. The pending axis of a reduction must
  stay a whole axis. Anything else is computed as written."""
  new_sizes = tuple(new_sizes)
  if isinstance(x, Pending):
    return [_pending_reshape(x, new_sizes)]
  shape = x.shape if isinstance(x, Split) else tuple(x.shape)
  pairs = {o: i for o, i in x.pairs if i == o + 1} if isinstance(
      x, Split) else {}
  groups = _groups(shape, new_sizes, pairs)
  out_pairs = []
  # a pair whose axes are apart (the batch between blocks and elements)
  # stays a pair when each of its axes is an output axis unchanged
  apart = [(o, i) for o, i in getattr(x, "pairs", ()) if o not in pairs]
  alone = {ins[0]: outs[0] for ins, outs in groups or ()
           if len(ins) == 1 and len(outs) == 1}
  if any(o not in alone or i not in alone for o, i in apart):
    x = _unmerge(x, [p for p in apart if p[0] not in alone or
                     p[1] not in alone])
    return _reshape(x, new_sizes, splits)
  out_pairs += [(alone[o], alone[i]) for o, i in apart]
  # an adjacent pair is merged in the order of its axes: regrouping a
  # group that holds it is the same reshape of the merged axis
  for ins, outs in groups if groups is not None else ():
    sizes = [new_sizes[j] for j in outs]
    if len(ins) == 2 and ins[0] in pairs:
      if len(outs) == 2 and sizes == [shape[ins[0]], shape[ins[1]]]:
        out_pairs.append(tuple(outs))      # kept
    elif (len(ins) == 1 and ins[0] not in pairs and len(outs) == 2
          and min(sizes) > 1):
      out_pairs.append(tuple(outs))        # split into blocks
      if splits is not None:
        splits.add(tuple(sizes))
  if groups is None:
    return [lax.reshape(plain(x), new_sizes)]
  merged = x.merged if isinstance(x, Split) else x
  out_pairs = tuple(out_pairs)
  return [_wrap(lax.reshape(merged, _merged_shape(new_sizes, out_pairs)),
                new_sizes, out_pairs)]


def _groups(shape, new_sizes, pairs):
  """Consecutive groups ``(input axes, output axes)`` of equal size, a
  pair's two (adjacent) axes always in one group, or None."""
  groups, d, j = [], 0, 0

  def take_input(group):
    nonlocal d
    if d in pairs:
      group += [d, d + 1]
      d += 2
      return shape[d - 2] * shape[d - 1]
    group.append(d)
    d += 1
    return shape[d - 1]
  while d < len(shape) or j < len(new_sizes):
    ins, outs, a, b = [], [], 1, 1
    one_in = d < len(shape) and shape[d] == 1
    one_out = j < len(new_sizes) and new_sizes[j] == 1
    if d < len(shape) and not (one_out and not one_in):
      a = take_input(ins)
    if j < len(new_sizes) and not (one_in and not one_out):
      outs.append(j)
      b, j = new_sizes[j], j + 1
    while a != b:
      if a < b and d < len(shape):
        a *= take_input(ins)
      elif b < a and j < len(new_sizes):
        outs.append(j)
        b, j = b * new_sizes[j], j + 1
      else:
        return None
    groups.append((ins, outs))
  return groups


def _merged_shape(shape, pairs):
  inner_of = dict(pairs)
  inners = set(inner_of.values())
  return tuple(n * (shape[inner_of[d]] if d in inner_of else 1)
               for d, n in enumerate(shape) if d not in inners)


def _whole_axis(in_shape, axis, out_shape):
  """The output axis that is ``axis`` of the input unchanged by a reshape,
  or None."""
  before = math.prod(in_shape[:axis])
  for b in range(len(out_shape)):
    if math.prod(out_shape[:b]) == before and out_shape[b] == in_shape[axis]:
      return b
  return None


def _pending_reshape(x, new_sizes):
  axis = _whole_axis(x.shape, x.axis, new_sizes)
  if axis is None:
    return _reshape(x.plain(), new_sizes)[0]
  done = x.done
  rest = _drop(new_sizes, axis)
  done = _reshape(done, rest)[0]
  return Pending(done, new_sizes, axis, x.op,
                 lambda: _reshape(x.plain(), new_sizes)[0])


# -- rules: each returns the outputs, or None to compute as written ------------
def _transpose(eqn, ins):
  x, = ins
  perm = list(eqn.params["permutation"])
  shape = tuple(x.shape[p] for p in perm)
  if isinstance(x, Pending):
    rest = [p - (p > x.axis) for p in perm if p != x.axis]
    return [Pending(_transpose(_Params(permutation=rest), [x.done])[0],
                    shape, perm.index(x.axis), x.op,
                    lambda: _transpose(eqn, [x.plain()])[0])]
  if not isinstance(x, Split):
    return [lax.transpose(x, tuple(perm))]
  pairs = tuple((perm.index(o), perm.index(i)) for o, i in x.pairs)
  # the merged axes in the new order of their (non-inner) original axes
  merged_perm = [x.at(p) for p in perm if p not in x.inners]
  return [Split(lax.transpose(x.merged, tuple(merged_perm)), shape, pairs)]


def _broadcast(eqn, ins):
  x = ins[0]
  shape = tuple(eqn.params["shape"])
  dims = tuple(eqn.params["broadcast_dimensions"])
  if len(ins) > 1:
    return None
  if isinstance(x, Pending):
    axis = dims[x.axis]
    if shape[axis] != x.shape[x.axis]:
      return None
    rest = tuple(d - (d > axis) for k, d in enumerate(dims) if k != x.axis)
    done = _broadcast(_Params(shape=_drop(shape, axis),
                              broadcast_dimensions=rest), [x.done])
    if done is None:
      return None
    return [Pending(done[0], shape, axis, x.op,
                    lambda: _broadcast(eqn, [x.plain()])[0])]
  if not isinstance(x, Split):
    return [lax.broadcast_in_dim(x, shape, dims)]
  pairs = tuple((dims[o], dims[i]) for o, i in x.pairs)
  out = Split(None, shape, pairs)
  merged_dims = tuple(out.at(dims[d]) for d in range(len(x.shape))
                      if d not in x.inners)
  return [Split(lax.broadcast_in_dim(x.merged, _merged_shape(shape, pairs),
                                     merged_dims), shape, pairs)]


def _squeeze(eqn, ins):
  return _reshape(ins[0], tuple(eqn.outvars[0].aval.shape))


@dataclasses.dataclass
class _Params:
  """What a rule reads of an equation, for a rule called on a part."""
  params: dict

  def __init__(self, **params):
    self.params = params


def _elementwise(eqn, ins):
  return _pointwise(eqn.primitive, eqn.params,
                    tuple(eqn.outvars[0].aval.shape), ins)


def _pointwise(primitive, params, shape, ins):
  """An elementwise op with the operands' pairs merged alike."""
  ins = [x.plain() if isinstance(x, Pending) else x for x in ins]
  splits = [x for x in ins if isinstance(x, Split)]
  pairs = sorted({p for x in splits for p in x.pairs})
  axes = [a for p in pairs for a in p]
  if len(axes) != len(set(axes)):
    return None
  merged = []
  for x in ins:
    if not isinstance(x, Split) and jnp.ndim(x) == 0 and shape:
      merged.append(x)
      continue
    own = x.shape if isinstance(x, Split) else tuple(jnp.shape(x))
    # a size-1 axis broadcasts (lax allows it): half a pair at 1 is
    # broadcast to the pair's size first
    half = [d for p in pairs for d in p
            if own[d] == 1 and own[p[0] + p[1] - d] != 1]
    if half:
      full = tuple(shape[d] if d in half else n for d, n in enumerate(own))
      x = _broadcast(_Params(shape=full,
                             broadcast_dimensions=tuple(range(len(own)))),
                     [x])[0]
      own = full
    merged.append(_as_split(x, own, pairs).merged)
  params = {k: (None if k == "sharding" else v) for k, v in params.items()}
  outs = primitive.bind(*merged, **params)
  outs = outs if primitive.multiple_results else [outs]
  return [_wrap(o, shape, pairs) for o in outs]


def _dot_general(eqn, ins, pend=True):
  """Pairs of free axes stay pairs; a pair contracted (or batched) against
  the same pair of the other operand is contracted (batched) merged; a pair
  whose blocks are batched and whose elements are contracted is contracted
  merged, the sum over the blocks left :class:`Pending` (computed as
  written, that pair split back, when no sum over the blocks follows)."""
  ins = [x.plain() if isinstance(x, Pending) else x for x in ins]
  (contract, batch) = eqn.params["dimension_numbers"]
  shapes = [tuple(v.aval.shape) for v in eqn.invars]

  def role(s, d):
    if d in contract[s]:
      return "c", contract[s].index(d)
    if d in batch[s]:
      return "b", batch[s].index(d)
    return None

  def partner(s, d):
    r = role(s, d)
    return None if r is None else (contract if r[0] == "c" else batch)[1 - s][
        r[1]]

  # a pair whose two axes play different parts (heads split into groups,
  # one batched and one free) is split back first
  ins = list(ins)
  for s in (0, 1):
    if isinstance(ins[s], Split):
      mixed = [(o, i) for o, i in ins[s].pairs
               if (role(s, o) is None) != (role(s, i) is None) or (
                   role(s, o) and role(s, i) and role(s, o)[0] != role(s, i)[0]
                   and (role(s, o)[0], role(s, i)[0]) != ("b", "c"))]
      if mixed:
        ins[s] = _unmerge(ins[s], mixed)
  # blocks batched and elements contracted is a sum over the blocks left
  # pending only against the same pair of the other operand
  for s in (0, 1):
    if isinstance(ins[s], Split):
      other = set(ins[1 - s].pairs) if isinstance(ins[1 - s], Split) else ()
      lone = [(o, i) for o, i in ins[s].pairs
              if role(s, o) and role(s, i) and role(s, o)[0] != role(s, i)[0]
              and (not pend or (partner(s, o), partner(s, i)) not in other)]
      if lone:
        ins[s] = _unmerge(ins[s], lone)
  pairs = [set(x.pairs) if isinstance(x, Split) else set() for x in ins]
  pending = None
  for s in (0, 1):
    for o, i in list(pairs[s]):
      ro, ri = role(s, o), role(s, i)
      if ro is None and ri is None:
        continue            # free: stays a pair of the output
      if ro is None or ri is None:
        return None
      if ro[0] != ri[0]:
        if (ro[0], ri[0]) != ("b", "c"):
          return None
        pending = (o, i) if s == 0 else (partner(1, o), partner(1, i))
      pairs[1 - s].add((partner(s, o), partner(s, i)))
  for s in (0, 1):
    axes = [a for p in pairs[s] for a in p]
    if len(axes) != len(set(axes)):
      return None
  if pending is not None and sum(
      role(0, o) != role(0, i) and role(0, o) is not None
      and role(0, i) is not None for o, i in pairs[0]) != 1:
    return None
  operands = [_as_split(x, shapes[s], sorted(pairs[s]))
              for s, x in enumerate(ins)]
  # dimension numbers on the merged operands: a pair's inner axis goes
  # with its outer; the pending pair's outer is contracted, not batched
  pending_outer = [] if pending is None else [pending[0],
                                              partner(0, pending[0])]

  def merged(s, dims, skip=()):
    x = operands[s]
    return tuple(x.at(d) for d in dims
                 if d not in x.inners and d not in skip)
  m_contract = [merged(s, contract[s]) for s in (0, 1)]
  m_batch = [merged(s, batch[s], pending_outer[s:s + 1]) for s in (0, 1)]
  if pending is not None:
    m_contract = [m_contract[s] + (operands[s].at(pending_outer[s]),)
                  for s in (0, 1)]
  params = dict(eqn.params, out_sharding=None,
                dimension_numbers=(tuple(m_contract), tuple(m_batch)))
  done = lax.dot_general_p.bind(operands[0].merged, operands[1].merged,
                                **params)
  # where each operand axis lands in the output: batch, lhs free, rhs free
  out_shape = tuple(eqn.outvars[0].aval.shape)
  free = [[d for d in range(len(shapes[s])) if role(s, d) is None]
          for s in (0, 1)]
  position = [{d: k for k, d in enumerate(batch[0])}, {}]
  position[0].update({d: len(batch[0]) + k for k, d in enumerate(free[0])})
  position[1].update({d: len(batch[0]) + len(free[0]) + k
                      for k, d in enumerate(free[1])})
  out_pairs = set()
  for s in (0, 1):
    for o, i in pairs[s]:
      if o in position[s] and i in position[s]:
        out_pairs.add((position[s][o], position[s][i]))
  out_pairs = tuple(sorted(out_pairs))
  if pending is None:
    return [_wrap(done, out_shape, out_pairs)]
  axis = position[0][pending[0]]
  return [Pending(_wrap(done, _drop(out_shape, axis),
                        _drop_pairs(out_pairs, axis)),
                  out_shape, axis, "sum",
                  lambda: _computed(_dot_general(eqn, ins, pend=False), eqn,
                                    ins))]


def _computed(outs, eqn, ins):
  return (_bind(eqn, ins) if outs is None else outs)[0]


def _drop(shape, axis):
  return tuple(n for d, n in enumerate(shape) if d != axis)


def _drop_pairs(pairs, axis):
  return tuple((o - (o > axis), i - (i > axis)) for o, i in pairs)


def _reduce(eqn, ins, pend=True):
  """Over both axes of a pair: over the merged axis. Over a pair's elements
  only: over the merged axis, the reduction over the blocks left
  :class:`Pending` (computed as written, that pair split back, when none
  follows). Over a pair's blocks only: that pair split back first."""
  x, = ins
  op = _REDUCTIONS[eqn.primitive]
  axes = tuple(eqn.params["axes"])
  out_shape = tuple(eqn.outvars[0].aval.shape)
  if isinstance(x, Pending):
    if x.axis in axes and x.op == op:
      rest = tuple(a - (a > x.axis) for a in axes if a != x.axis)
      done = x.done
      if rest:
        done = _reduce_plain_or_split(done, rest, op)
      return [done]
    x = x.plain()
  if not isinstance(x, Split):
    return [_REDUCE[op].bind(x, axes=axes, **_extra(eqn))]
  split_back = [(o, i) for o, i in x.pairs
                if (o in axes and i not in axes) or
                (not pend and i in axes and o not in axes)]
  if split_back:
    x = _unmerge(x, split_back)
    if not isinstance(x, Split):
      return [_REDUCE[op].bind(x, axes=axes, **_extra(eqn))]
  pending = None
  for o, i in x.pairs:
    if (o in axes) != (i in axes):
      if pending is None:
        pending = (o, i)
      else:
        x = _unmerge(x, [(o, i)])
        return _reduce(eqn, [x], pend=False)
  full = [a for a in axes if a not in x.inners]
  if pending is not None:
    full = [a for a in full if a != pending[0]] + [pending[0]]
  merged_axes = tuple(sorted({x.at(a) for a in full}))
  done = _REDUCE[op].bind(x.merged, axes=merged_axes, **_extra(eqn))
  kept = [d for d in range(len(x.shape)) if d not in axes]
  new = {d: k for k, d in enumerate(kept)}
  out_pairs = tuple((new[o], new[i]) for o, i in x.pairs
                    if o in new and i in new)
  if pending is None:
    return [_wrap(done, out_shape, out_pairs)]
  axis = new[pending[0]]
  return [Pending(_wrap(done, _drop(out_shape, axis),
                        _drop_pairs(out_pairs, axis)),
                  out_shape, axis, op,
                  lambda: _reduce(eqn, [x], pend=False)[0])]


def _reduce_plain_or_split(x, axes, op):
  if isinstance(x, Split):
    return _reduce_split(x, axes, op)
  return _REDUCE[op].bind(x, axes=tuple(axes), out_sharding=None)


def _reduce_split(x, axes, op):
  if any((o in axes) != (i in axes) for o, i in x.pairs):
    x = plain(x)
    return _REDUCE[op].bind(x, axes=tuple(axes), out_sharding=None)
  merged_axes = tuple(sorted({x.at(a) for a in axes if a not in x.inners}))
  done = _REDUCE[op].bind(x.merged, axes=merged_axes, out_sharding=None)
  kept = [d for d in range(len(x.shape)) if d not in axes]
  new = {d: k for k, d in enumerate(kept)}
  out_pairs = tuple((new[o], new[i]) for o, i in x.pairs if o in new)
  return _wrap(done, tuple(x.shape[d] for d in kept), out_pairs)


def _extra(eqn):
  return {k: (None if k == "out_sharding" else v)
          for k, v in eqn.params.items() if k != "axes"}


def _whole_slice(eqn, ins):
  """A dynamic slice as large as its operand is the operand (its starts
  are clamped to 0)."""
  x = ins[0]
  if tuple(eqn.params["slice_sizes"]) == tuple(eqn.invars[0].aval.shape):
    return [x]
  return None


_RULES = {
    P.dynamic_slice_p: _whole_slice,
    P.transpose_p: _transpose, P.squeeze_p: _squeeze,
    P.broadcast_in_dim_p: _broadcast,
    P.dot_general_p: _dot_general,
    P.reduce_sum_p: _reduce, P.reduce_max_p: _reduce, P.reduce_min_p: _reduce,
}


# -- scans ---------------------------------------------------------------------
def _scan(eqn, ins, changed, known_ins):
  """A map (no carry), or a scan whose carries accumulate or are sums
  rescaled by a running maximum (:mod:`scanagram.accumulations`), as its
  body vmapped over the iterations and reduced; else None. A map's
  fori_loops that skip future key blocks become scans over all of them
  (:mod:`scanagram.skipping`)."""
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  if n_carry == 0 and (skipping.fori_loops(body.jaxpr) or
                       skipping.window_slices(body.jaxpr)):
    # each operand's block size along axis 0; the queries' (the xs')
    operand_blocks = [next((x.shape[i] for o, i in x.pairs if o == 0), None)
                      if isinstance(x, Split) else None for x in ins]
    blocks = {b for b in operand_blocks[n_consts:] if b is not None}
    query_block = blocks.pop() if len(blocks) == 1 else None
    body = skipping.fori_as_scan(body, n_consts, known_ins, query_block,
                                 p["length"], operand_blocks)
    if isinstance(body, str):
      changed.why.append(body)
      return None
    sliced = skipping.slices_as_whole(body, n_consts, known_ins,
                                      query_block, p["length"],
                                      operand_blocks)
    if isinstance(sliced, str):
      changed.why.append(sliced)
      return None
    body = sliced.body
    if sliced.past is not None:
      changed.windows.append(sliced.past)
  forms = accumulations.carry_forms(body.jaxpr, n_consts, n_carry)
  consts = list(ins[:n_consts])
  init = ins[n_consts:n_consts + n_carry]
  xs = list(ins[n_consts + n_carry:])
  if forms is None or not xs:
    return None
  in_avals = [v.aval for v in eqn.invars]
  if accumulations.check_rescaled(body, forms, n_consts, n_carry,
                                  in_avals) is not None:
    return None
  rescaled = [f for f in forms if f.op == "rescaled"]
  accumulated = [f for f in forms if f.op != "rescaled"]
  skip = [e for f in forms for e in f.core]
  ys = list(body.jaxpr.outvars[n_carry:])

  # the accumulations and the outputs: no carry is read
  def first(consts, xs):
    env = _iteration_env(body, n_consts, n_carry, consts, xs, skip, {})
    return ([accumulations.apply_chain(f.out, _read(env, f.given))
             for f in accumulated] + [_read(env, y) for y in ys])
  outs = _vmapped(first, consts, xs, in_avals, n_consts, n_carry, (),
                  changed)
  finals = {}
  acc_outs = outs[:len(accumulated)]
  for f, stacked in zip(accumulated, acc_outs):
    k = forms.index(f)
    finals[k] = _combine(f.op, init[k], _reduce_over_iterations(stacked, f.op))
  if rescaled:
    # every iteration at the final maxima, where the rescaling is 1
    maxima = [f for f in forms if f.op == "max"]
    final_maxima = [finals[forms.index(f)] for f in maxima]

    def second(consts, xs, maxima_now):
      seeds = {}
      for f, m in zip(maxima, maxima_now):
        view = accumulations.apply_chain(f.into, m)
        seeds[f.view] = view
        seeds[f.result] = view
      env = _iteration_env(body, n_consts, n_carry, consts, xs, skip, seeds)
      return [accumulations.apply_chain(f.out, _read(env, f.given))
              for f in rescaled]
    sums = _vmapped(second, consts, xs, in_avals, n_consts, n_carry,
                    final_maxima, changed)
    for f, stacked in zip(rescaled, sums):
      k = forms.index(f)
      finals[k] = _combine("sum", init[k],
                           _reduce_over_iterations(stacked, "sum"))
  return [finals[k] for k in range(n_carry)] + list(outs[len(accumulated):])


def _read(env, v):
  return v.val if isinstance(v, jex_core.Literal) else env[v]


def _iteration_env(body, n_consts, n_carry, consts, xs, skip, seeds):
  """The values one iteration computes from its consts and xs (and
  ``seeds``), the equations reading a carry left out."""
  jaxpr = body.jaxpr
  env = dict(zip(jaxpr.constvars, body.consts))
  env.update(zip(jaxpr.invars[:n_consts], consts))
  env.update(zip(jaxpr.invars[n_consts + n_carry:], xs))
  env.update(seeds)
  skip = {id(e) for e in skip}
  for e in jaxpr.eqns:
    if id(e) in skip or any(v in env for v in e.outvars) or any(
        isinstance(v, jex_core.Var) and v not in env for v in e.invars):
      continue
    with _jax_internals.traced_as(e.source_info):
      outs = e.primitive.bind(*[_read(env, v) for v in e.invars],
                              **e.params)
    env.update(zip(e.outvars, outs if e.primitive.multiple_results
                   else [outs]))
  return env


def _vmapped(iteration, consts, xs, in_avals, n_consts, n_carry, extra,
             changed):
  """``iteration(consts, xs, extra)`` vmapped over the xs' leading axis,
  traced and rewritten on the interpreter's values."""
  const_avals = in_avals[:n_consts]
  x_avals = in_avals[n_consts + n_carry:]
  extra_avals = [_aval(x) for x in extra]
  n_x = len(x_avals)

  def flat(*args):
    c = args[:n_consts]
    x = args[n_consts:n_consts + n_x]
    rest = args[n_consts + n_x:]
    return iteration(c, x, rest) if extra_avals else iteration(c, x)
  vmapped = jax.make_jaxpr(jax.vmap(
      flat, in_axes=(None,) * n_consts + (0,) * n_x +
      (None,) * len(extra_avals)))(
          *[jax.ShapeDtypeStruct(a.shape, a.dtype)
            for a in list(const_avals) + list(x_avals) + extra_avals])
  return _eval(vmapped.jaxpr, vmapped.consts,
               list(consts) + list(xs) + list(extra), changed)


def _aval(x):
  if isinstance(x, (Split, Pending)):
    return jax.ShapeDtypeStruct(x.shape, _dtype(x))
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _dtype(x):
  if isinstance(x, Pending):
    return _dtype(x.done)
  if isinstance(x, Split):
    return x.merged.dtype
  return jnp.result_type(x)


def _reduce_over_iterations(stacked, op):
  """``stacked`` reduced by ``op`` over its leading axis (the iterations)."""
  if isinstance(stacked, Pending):
    if stacked.axis == 0 and stacked.op == op:
      return stacked.done
    stacked = stacked.plain()
  if isinstance(stacked, Split):
    return _reduce_split(stacked, (0,), op)
  return _REDUCE[op].bind(stacked, axes=(0,), out_sharding=None)


def _combine(op, a, b):
  primitive = {"sum": P.add_p, "max": P.max_p, "min": P.min_p}[op]
  shape = a.shape if not isinstance(a, (Split, Pending)) else a.shape
  out = _pointwise(primitive, {}, tuple(shape), [a, b])
  return out[0] if out is not None else primitive.bind(plain(a), plain(b))
