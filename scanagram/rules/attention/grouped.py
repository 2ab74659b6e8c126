"""Keys and values repeated over query heads (grouped-query and multi-query
attention): the buffer holds them as they were before ``jnp.repeat``,
``jnp.broadcast_to`` or ``jnp.tile``, at the key/value head count, as a
hand-written cache does, and the contraction reads them grouped.

Each axis of the repeated operand is described by its *factors*, outermost
first: an axis of the source (an int) or a repeat (a str label), with their
sizes. ``jnp.repeat(k, g, axis=2)`` on ``[B, T, Hkv, D]`` gives the axes
``(0,) (1,) (2, "r0") (3,)``: the head axis is ``Hkv`` source heads, each
repeated ``g`` times. The contraction is then a product of the other operand
(its paired axes split the same way) with the source, where a repeat paired
with a batch axis becomes a free axis of the other operand (the query heads
of one group) and a repeat paired with a contracted axis is summed on the
other operand alone. The other operand is the dot's lhs, as in a
hand-written grouped step.
"""
import itertools
import string
from typing import Any, NamedTuple, Optional

import numpy as np
import jax.numpy as jnp
from jax import lax

from scanagram.kinds import UNSCANNED, Scanned, is_scanned

_VIEWS = ("broadcast_in_dim", "reshape", "tile", "squeeze")


class Expansion(NamedTuple):
  source: Any        # the variable before the repeat
  kind: Scanned      # its kind
  shape: tuple       # its shape
  factors: tuple     # per axis of the repeated operand: ((label, size), ...)


def expansion_of(e, i) -> Optional[Expansion]:
  """Operand ``i`` of ``e`` as a repeat of a scanned source along axes other
  than time, or None (nothing repeated, or a chain this module does not
  read)."""
  var, kind = e.eqn.invars[i], e.in_kinds[i]
  chain = []
  while True:
    made = e.made_from(var)
    if made is None:
      break
    eqn, kinds = made
    if eqn.primitive.name not in _VIEWS or not is_scanned(kinds[0]) or (
        kinds[0].ahead != kind.ahead) or any(
            k is not UNSCANNED for k in kinds[1:]):
      break
    chain.append((eqn, kinds[0]))
    var = eqn.invars[0]
  # the furthest source whose views this module reads (a reshape that
  # splits the projection's features into heads may stop it)
  while chain:
    x = _expansion(chain, kind)
    if x is not None:
      return x
    chain.pop()
  return None


def _expansion(chain, kind):
  """The repeated operand as an :class:`Expansion` of the input of the last
  equation of ``chain``, or None."""
  var, source_kind = chain[-1][0].invars[0], chain[-1][1]
  shape = tuple(var.aval.shape)
  factors = [((d, n),) if n != 1 else () for d, n in enumerate(shape)]
  labels = (f"r{n}" for n in itertools.count())
  for eqn, _ in reversed(chain):
    factors = _through(eqn, factors, labels)
    if factors is None:
      return None
  if factors[kind.axis] != ((source_kind.axis, shape[source_kind.axis]),):
    return None
  if not any(isinstance(label, str) for f in factors for label, _ in f):
    return None   # a reshape of the source alone: nothing to save
  return Expansion(var, source_kind, shape, tuple(factors))


def _through(eqn, factors, labels):
  """The factors of ``eqn``'s output from its input's, or None."""
  name, params = eqn.primitive.name, eqn.params
  out_shape = eqn.outvars[0].aval.shape
  if name == "broadcast_in_dim":
    if params.get("sharding") is not None:
      return None
    dims = list(params["broadcast_dimensions"])
    in_shape = eqn.invars[0].aval.shape
    out = []
    for o, n in enumerate(out_shape):
      if o in dims and in_shape[dims.index(o)] == n:
        out.append(factors[dims.index(o)])
      else:
        out.append(((next(labels), n),) if n != 1 else ())
    return out
  if name == "tile":
    return [((next(labels), r),) + f if r != 1 else f
            for f, r in zip(factors, params["reps"])]
  if name == "squeeze":
    ndim = len(factors)
    dims = {d % ndim for d in params["dimensions"]}
    return [f for d, f in enumerate(factors) if d not in dims]
  # reshape: regroup the factors in order; a factor may not be split
  if params.get("dimensions") is not None:
    return None
  flat, out = [f for axis in factors for f in axis], []
  for n in out_shape:
    group, size = [], 1
    while size < n and flat:
      group.append(flat.pop(0))
      size *= group[-1][1]
    if size != n:
      return None
    out.append(tuple(group))
  return None if flat else out


def source_batch_first(x: Expansion, batch_axes) -> list:
  """A layout of the source with the axes that make up the repeated
  operand's ``batch_axes`` first (the cache's ``[B, Hkv, L, D]``)."""
  first = [label for a in batch_axes for label, _ in x.factors[a]
           if isinstance(label, int)]
  return first + [d for d in range(len(x.shape)) if d not in first]


def grouped_contraction(params, side, other_ndim, x: Expansion, perm):
  """``run(other, source) -> out``: ``dot_general(params)`` with operand
  ``side`` the repeat ``x`` of ``source`` (given in the layout ``perm`` of
  the source's axes), computed without repeating it. None when the repeat
  cannot be read grouped (a repeated free axis)."""
  (contract, batch) = params["dimension_numbers"]
  pairs = {}   # axis of the repeated operand -> (other's axis, batch?)
  for c_other, c_x in zip(contract[1 - side], contract[side]):
    pairs[c_x] = (c_other, False)
  for b_other, b_x in zip(batch[1 - side], batch[side]):
    pairs[b_x] = (b_other, True)
  letters = iter(string.ascii_letters)
  source_label = {d: next(letters) for d in range(len(x.shape))}
  repeat_label = {}

  def label(factor):
    name, _ = factor
    if isinstance(name, int):
      return source_label[name]
    return repeat_label.setdefault(name, next(letters))

  other_axes = {o: a for a, (o, _) in pairs.items()}
  other_spec, other_split = [], []   # labels per other axis; split sizes
  for d in range(other_ndim):
    if d in other_axes:
      factors = x.factors[other_axes[d]]
      other_spec.append([label(f) for f in factors])
      # one factor: the axis as it is (a key axis is L long in a fresh
      # block but a ring's window plus the block in a later one)
      other_split.append(None if len(factors) == 1 else
                         [n for _, n in factors])
    else:
      other_spec.append([next(letters)])
      other_split.append(None)
  x_free = [a for a in range(len(x.factors)) if a not in pairs]
  if any(isinstance(n, str) for a in x_free for n, _ in x.factors[a]):
    return None
  out_groups = [[label(f) for f in x.factors[b]] for b in batch[side]]
  other_free = [other_spec[d] for d in range(other_ndim)
                if d not in contract[1 - side] and d not in batch[1 - side]]
  free_x = [[label(f) for f in x.factors[a]] for a in x_free]
  out_groups += other_free + free_x if side == 1 else free_x + other_free
  source_spec = [source_label[d] for d in perm]
  other_flat = [c for group in other_spec for c in group]
  out_flat = [c for group in out_groups for c in group]
  # the other operand as the lhs whatever the user's order: XLA's CPU dot
  # then reads the buffer in place, as a hand-written grouped einsum does
  # (``bkgd,bkTd->bkgT``, ``bkgT,bkTd->bkgd``)
  batch_labels = [c for c in other_flat if c in source_spec and c in out_flat]
  contract_labels = [c for c in other_flat
                     if c in source_spec and c not in out_flat]
  # a repeat paired with a contracted axis: the other operand summed over it
  other_sum = [c for c in other_flat
               if c not in source_spec and c not in out_flat]
  source_sum = [c for c in source_spec
                if c not in other_flat and c not in out_flat]   # size 1
  other_kept = [c for c in other_flat if c not in other_sum]
  source_kept = [c for c in source_spec if c not in source_sum]
  dims = (([other_kept.index(c) for c in contract_labels],
           [source_kept.index(c) for c in contract_labels]),
          ([other_kept.index(c) for c in batch_labels],
           [source_kept.index(c) for c in batch_labels]))
  dot_out = batch_labels + [c for c in other_kept if c not in batch_labels
                            and c not in contract_labels] + [
      c for c in source_kept if c not in batch_labels and
      c not in contract_labels]
  to_out = [dot_out.index(c) for c in out_flat]
  precision = params.get("precision")
  preferred = params.get("preferred_element_type")

  def run(other, source):
    shape = []
    for n, split in zip(other.shape, other_split):
      shape += [n] if split is None else split
    other = other.reshape(shape)
    if other_sum:
      other = other.sum([other_flat.index(c) for c in other_sum])
    if source_sum:
      source = source.sum([source_spec.index(c) for c in source_sum])
    out = lax.dot_general(other, source, dims, precision=precision,
                          preferred_element_type=preferred)
    out = jnp.transpose(out, to_out)
    sizes, i = [], 0
    for group in out_groups:
      sizes.append(int(np.prod(out.shape[i:i + len(group)], dtype=np.int64)))
      i += len(group)
    return out.reshape(sizes)
  return run
