"""The rules of :mod:`scanagram.untile` for one equation on split values:
each returns the outputs, or None for the equation as written (on the
split layout restored by a reshape)."""
import math

import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram.rules.elementwise import ELEMENTWISE
from scanagram.untile.values import (
    Pending, Split, as_split, bind_plain, drop, drop_pairs, merged_shape,
    plain, unmerge, wrap)

_ELEMENTWISE = frozenset(ELEMENTWISE)
_REDUCTIONS = {P.reduce_sum_p: "sum", P.reduce_max_p: "max",
               P.reduce_min_p: "min"}
REDUCE = {"sum": P.reduce_sum_p, "max": P.reduce_max_p,
          "min": P.reduce_min_p}


def reshape(x, new_sizes, splits=None):
  """A reshape on the merged layout: the axes are grouped so that each group
  of the input and of the output has one size; a pair is merged back into
  one axis or kept, one axis split into two (both > 1) starts a pair, other
  groups are regrouped as written. The pending axis of a reduction must
  stay a whole axis. Anything else is computed as written."""
  new_sizes = tuple(new_sizes)
  if isinstance(x, Pending):
    return [_pendingreshape(x, new_sizes)]
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
    x = unmerge(x, [p for p in apart if p[0] not in alone or
                     p[1] not in alone])
    return reshape(x, new_sizes, splits)
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
  return [wrap(lax.reshape(merged, merged_shape(new_sizes, out_pairs)),
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


def _whole_axis(in_shape, axis, out_shape):
  """The output axis that is ``axis`` of the input unchanged by a reshape,
  or None."""
  before = math.prod(in_shape[:axis])
  for b in range(len(out_shape)):
    if math.prod(out_shape[:b]) == before and out_shape[b] == in_shape[axis]:
      return b
  return None


def _pendingreshape(x, new_sizes):
  axis = _whole_axis(x.shape, x.axis, new_sizes)
  if axis is None:
    return reshape(x.plain(), new_sizes)[0]
  done = x.done
  rest = drop(new_sizes, axis)
  done = reshape(done, rest)[0]
  return Pending(done, new_sizes, axis, x.op,
                 lambda: reshape(x.plain(), new_sizes)[0])


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
    done = _broadcast(_Params(shape=drop(shape, axis),
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
  return [Split(lax.broadcast_in_dim(x.merged, merged_shape(shape, pairs),
                                     merged_dims), shape, pairs)]


def _squeeze(eqn, ins):
  return reshape(ins[0], tuple(eqn.outvars[0].aval.shape))


class _Params:
  """What a rule reads of an equation, for a rule called on a part."""

  def __init__(self, **params):
    self.params = params


def elementwise(eqn, ins):
  return pointwise(eqn.primitive, eqn.params,
                    tuple(eqn.outvars[0].aval.shape), ins)


def pointwise(primitive, params, shape, ins):
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
    merged.append(as_split(x, own, pairs).merged)
  params = {k: (None if k == "sharding" else v) for k, v in params.items()}
  outs = primitive.bind(*merged, **params)
  outs = outs if primitive.multiple_results else [outs]
  return [wrap(o, shape, pairs) for o in outs]


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
        ins[s] = unmerge(ins[s], mixed)
  # blocks batched and elements contracted is a sum over the blocks left
  # pending only against the same pair of the other operand
  for s in (0, 1):
    if isinstance(ins[s], Split):
      other = set(ins[1 - s].pairs) if isinstance(ins[1 - s], Split) else ()
      lone = [(o, i) for o, i in ins[s].pairs
              if role(s, o) and role(s, i) and role(s, o)[0] != role(s, i)[0]
              and (not pend or (partner(s, o), partner(s, i)) not in other)]
      if lone:
        ins[s] = unmerge(ins[s], lone)
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
  operands = [as_split(x, shapes[s], sorted(pairs[s]))
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
    return [wrap(done, out_shape, out_pairs)]
  axis = position[0][pending[0]]
  return [Pending(wrap(done, drop(out_shape, axis),
                        drop_pairs(out_pairs, axis)),
                  out_shape, axis, "sum",
                  lambda: _computed(_dot_general(eqn, ins, pend=False), eqn,
                                    ins))]


def _computed(outs, eqn, ins):
  return (bind_plain(eqn, ins) if outs is None else outs)[0]


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
    return [REDUCE[op].bind(x, axes=axes, **_extra(eqn))]
  split_back = [(o, i) for o, i in x.pairs
                if (o in axes and i not in axes) or
                (not pend and i in axes and o not in axes)]
  if split_back:
    x = unmerge(x, split_back)
    if not isinstance(x, Split):
      return [REDUCE[op].bind(x, axes=axes, **_extra(eqn))]
  pending = None
  for o, i in x.pairs:
    if (o in axes) != (i in axes):
      if pending is None:
        pending = (o, i)
      else:
        x = unmerge(x, [(o, i)])
        return _reduce(eqn, [x], pend=False)
  full = [a for a in axes if a not in x.inners]
  if pending is not None:
    full = [a for a in full if a != pending[0]] + [pending[0]]
  merged_axes = tuple(sorted({x.at(a) for a in full}))
  done = REDUCE[op].bind(x.merged, axes=merged_axes, **_extra(eqn))
  kept = [d for d in range(len(x.shape)) if d not in axes]
  new = {d: k for k, d in enumerate(kept)}
  out_pairs = tuple((new[o], new[i]) for o, i in x.pairs
                    if o in new and i in new)
  if pending is None:
    return [wrap(done, out_shape, out_pairs)]
  axis = new[pending[0]]
  return [Pending(wrap(done, drop(out_shape, axis),
                        drop_pairs(out_pairs, axis)),
                  out_shape, axis, op,
                  lambda: _reduce(eqn, [x], pend=False)[0])]


def _reduce_plain_or_split(x, axes, op):
  if isinstance(x, Split):
    return reduce_split(x, axes, op)
  return REDUCE[op].bind(x, axes=tuple(axes), out_sharding=None)


def reduce_split(x, axes, op):
  if any((o in axes) != (i in axes) for o, i in x.pairs):
    x = plain(x)
    return REDUCE[op].bind(x, axes=tuple(axes), out_sharding=None)
  merged_axes = tuple(sorted({x.at(a) for a in axes if a not in x.inners}))
  done = REDUCE[op].bind(x.merged, axes=merged_axes, out_sharding=None)
  kept = [d for d in range(len(x.shape)) if d not in axes]
  new = {d: k for k, d in enumerate(kept)}
  out_pairs = tuple((new[o], new[i]) for o, i in x.pairs if o in new)
  return wrap(done, tuple(x.shape[d] for d in kept), out_pairs)


def _extra(eqn):
  return {k: (None if k == "out_sharding" else v)
          for k, v in eqn.params.items() if k != "axes"}


RULES = {
    P.transpose_p: _transpose, P.squeeze_p: _squeeze,
    P.broadcast_in_dim_p: _broadcast,
    P.dot_general_p: _dot_general,
    P.reduce_sum_p: _reduce, P.reduce_max_p: _reduce, P.reduce_min_p: _reduce,
}




def rule_for(primitive):
  """The rule for ``primitive`` on split values, or None."""
  return elementwise if primitive in _ELEMENTWISE else RULES.get(primitive)
