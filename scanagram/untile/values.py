"""The values of :mod:`scanagram.untile`'s interpreter: an array, a
:class:`Split` (an axis split into blocks, held merged) or a
:class:`Pending` (a reduction over a block's elements whose reduction over
the blocks is still to come)."""
import dataclasses
from typing import Any, Tuple

from jax import lax


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


# -- values --------------------------------------------------------------------
def plain(x):
  """``x`` as an array of its original shape."""
  if isinstance(x, Pending):
    return plain(x.plain())
  if not isinstance(x, Split):
    return x
  return unmerge(x, x.pairs)


def unmerge(x: Split, pairs):
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


def merge(a, shape, pairs):
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


def as_split(x, shape, pairs):
  """Operand ``x`` of ``shape`` (an array, a Split or a Pending) with
  exactly ``pairs`` merged."""
  if isinstance(x, Pending):
    x = x.plain()
  if isinstance(x, Split):
    extra = [p for p in x.pairs if p not in pairs]
    if extra:
      x = unmerge(x, extra)
  if isinstance(x, Split):
    missing = [p for p in pairs if p not in x.pairs]
    if not missing:
      return x
    # the missing pairs merged in the merged array: the same layout
    inner = merge(x.merged, tuple(x.merged.shape),
                   [(x.at(o), x.at(i)) for o, i in missing])
    return Split(inner.merged, tuple(shape), tuple(pairs))
  return merge(x, shape, pairs)


def wrap(merged, shape, pairs):
  return Split(merged, tuple(shape), tuple(pairs)) if pairs else merged


# -- the evaluator ---------------------------------------------------------------
def bind_plain(eqn, ins):
  outs = eqn.primitive.bind(*[plain(x) for x in ins], **eqn.params)
  return list(outs) if eqn.primitive.multiple_results else [outs]




def merged_shape(shape, pairs):
  inner_of = dict(pairs)
  inners = set(inner_of.values())
  return tuple(n * (shape[inner_of[d]] if d in inner_of else 1)
               for d, n in enumerate(shape) if d not in inners)


def drop(shape, axis):
  return tuple(n for d, n in enumerate(shape) if d != axis)


def drop_pairs(pairs, axis):
  return tuple((o - (o > axis), i - (i > axis)) for o, i in pairs)
