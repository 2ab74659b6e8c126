"""The two contractions of attention: ``q·kᵀ`` (rows against every key,
the keys join a buffer) and the weights times the values (causal when the
weights are exactly 0 at every future key; the values join a buffer)."""
from typing import Any, NamedTuple

import jax.numpy as jnp
from jax.extend.core import primitives as P

from scanagram.interpreter import Converted, bind, block_values, register
from scanagram.kinds import TAINTED_FINITE, History, Scanned, is_scanned
from scanagram.rules.attention.learning import ATTENTION
from scanagram.rules import linalg
from scanagram.rules.attention import grouped
from scanagram.rules.attention.buffers import (Buffer, RingBuffer,
                                               batch_dims_first, make_buffer)
from scanagram.rules.common import dot_out_axis


@register(P.dot_general_p)
def dot_general_rule(e):
  """Attention's ``q·kᵀ`` when both operands are scanned and neither scanned
  axis is contracted or batched; otherwise the plain contraction rule."""
  if is_attention_contraction(e):
    return scores_rule(e)
  return linalg.dot_general_rule(e)


def is_attention_contraction(e) -> bool:
  """Both operands scanned, neither scanned axis contracted nor batched."""
  if not all(is_scanned(k) for k in e.in_kinds):
    return False
  (contract, batch) = e.params["dimension_numbers"]
  return all(k.axis not in contract[s] and k.axis not in batch[s]
             for s, k in enumerate(e.in_kinds))



def scores_rule(e):
  """``q·kᵀ``: rows of the queries against every position of the keys. The
  keys join a buffer (a ring when a later mask proved a window), before any
  repeat over query heads; the scores are History with future
  ``TAINTED_FINITE`` (the buffer's unfilled part is zeros).
  The queries are the lhs unless a first conversion found the mask proving
  the other way round (``k·qᵀ``, as einops and named einsums write it)."""
  origin = id(e.eqn)
  notes = e.conversion.notes(ATTENTION)
  ks = 0 if origin in notes.facts.keys_first else 1
  qs = 1 - ks
  q, k = e.in_kinds[qs], e.in_kinds[ks]
  dims = e.params["dimension_numbers"]
  ndims = [a.ndim for a in e.in_avals]
  # what a retry with the roles swapped would need (see learning.ATTENTION)
  notes.score_products[origin] = (
      dims, tuple(a.shape for a in e.in_avals))
  window = notes.facts.rings.get(origin)
  if q.ahead != k.ahead:
    window = None
  kind = History(dot_out_axis(dims, qs, q.axis, ndims),
                 dot_out_axis(dims, ks, k.axis, ndims),
                 q.ahead, TAINTED_FINITE, window, origin)
  grouped = _grouped(e, ks, window)
  if grouped is not None:
    return Converted([kind], grouped.advance, grouped.stateful,
                     reads=(grouped.source,))
  # with rows (the block vmapped), the queries' batch axes first too: XLA
  # would otherwise transpose the whole key buffer to meet them every step.
  # (Without rows the same transpose makes it copy every buffer instead.)
  q_perm, params = None, e.params
  if e.conversion.rows:
    q_perm, params = batch_dims_first(e.params, e.in_avals, qs)
    q_perm = None if q_perm == sorted(q_perm) else q_perm
  buffer, params = make_buffer(k, e, ks, window, params)
  keys, stateful = _shared(e, e.eqn.invars[ks], buffer)

  def advance(ctx, buf, ins):   # state: the key buffer
    ins = list(ins)
    buf, ins[ks] = keys(ctx, buf, ins[ks])
    if q_perm is not None:
      ins[qs] = jnp.transpose(ins[qs], q_perm)
    return buf, bind(e.eqn, ins, params)
  return Converted([kind], advance, stateful)


class _Grouped(NamedTuple):
  source: Any        # the variable the buffer holds
  advance: Any
  stateful: bool


def _shared(e, var, buffer):
  """``(read, stateful)``: ``read(ctx, buf, x) -> (buf, values)`` runs
  ``buffer`` on ``var``'s block. One buffer per distinct value: the first
  equation of the jaxpr that buffers ``var`` this way keeps the buffer; a
  later one (the values of ``k·qᵀ`` when v is k, a layer reusing an earlier
  layer's keys) reads what the first computed for the block."""
  key = ("buffer", e.value_key(var), buffer.perm and tuple(buffer.perm),
         buffer.ahead,
         getattr(buffer, "window", None))
  if e.first_to_share(key):
    def keep(ctx, buf, x):
      buf, values = buffer.advance(ctx, buf, x)
      block_values()[key] = values
      return buf, values
    return keep, True
  return (lambda ctx, buf, x: (buf, block_values()[key])), False


def _grouped(e, side, window):
  """Operand ``side`` buffered before its repeat over heads, and the
  contraction read grouped from that buffer, or None (see
  :mod:`grouped`)."""
  x = grouped.expansion_of(e, side)
  if x is None:
    return None
  (_, batch) = e.params["dimension_numbers"]
  perm = grouped.source_batch_first(x, batch[side])
  other = 1 - side
  run = grouped.grouped_contraction(e.params, side, e.in_avals[other].ndim,
                                    x, perm)
  if run is None:
    return None
  size = x.shape[x.kind.axis]
  if window is None:
    buffer = Buffer(x.kind.axis, size, x.kind.ahead, perm)
  else:
    buffer = RingBuffer(x.kind.axis, size, x.kind.ahead, window, perm)

  read, stateful = _shared(e, x.source, buffer)

  def advance(ctx, buf, ins):   # state: the buffer of the source
    buf, source = read(ctx, buf, ins[-1])
    return buf, [run(ins[other], source)]
  return _Grouped(x.source, advance, stateful)


@register(P.dot_general_p, kind=History, aligned=False)
def weights_times_values_rule(e):
  """Weights (History) contracted over their key axis with a scanned value's
  time axis: causal when the weights are exactly 0 at every future key. The
  values join a buffer (before any repeat over query heads)."""
  hs = 0 if isinstance(e.in_kinds[0], History) else 1
  vs = 1 - hs
  h, v = e.in_kinds[hs], e.in_kinds[vs]
  (contract, batch) = e.params["dimension_numbers"]
  if not is_scanned(v) or h.key_axis not in contract[hs] or v.axis not in (
      contract[vs]) or (contract[hs].index(h.key_axis) !=
                        contract[vs].index(v.axis)):
    # perhaps k·qᵀ (a multiplicative mask proves nothing either way)
    e.conversion.notes(ATTENTION).refused_masks.add(h.origin)
    raise e.refuse(
        "attention scores may only be contracted over their key axis with "
        "the time axis of a value sequence")
  if h.axis in contract[hs] or h.axis in batch[hs]:
    # perhaps k·qᵀ: the rows are the keys
    e.conversion.notes(ATTENTION).refused_masks.add(h.origin)
    raise e.refuse("it contracts the query positions of attention scores")
  if not h.future.zero:
    e.conversion.notes(ATTENTION).refused_masks.add(h.origin)
    raise e.refuse(_why_weights_not_zero(h))
  if v.ahead < h.ahead or (h.window is not None and v.ahead != h.ahead):
    raise e.refuse("its values run behind the attention rows")
  ndims = [a.ndim for a in e.in_avals]
  out_axis = dot_out_axis((contract, batch), hs, h.axis, ndims)
  out_kinds = [Scanned(out_axis, h.ahead)]
  grouped_values = _grouped(e, vs, h.window)
  if grouped_values is not None:
    return Converted(out_kinds, grouped_values.advance,
                     grouped_values.stateful, reads=(grouped_values.source,))
  buffer, params = make_buffer(v, e, vs, h.window)
  read, stateful = _shared(e, e.eqn.invars[vs], buffer)
  contract_weights_first = _weights_first(e, params, hs)

  def advance(ctx, buf, ins):   # state: the value buffer
    buf, values = read(ctx, buf, ins[vs])
    return buf, contract_weights_first(ins[hs], values)
  return Converted(out_kinds, advance, stateful)


def _weights_first(e, params, hs):
  """``dot(weights, values)`` with the weights as the left operand whatever
  the user's order (``einsum("...Thd,...htT->...", v, w)``): XLA's CPU dot
  then streams the value buffer as a plain matrix product does, instead of
  reading it transposed. The output is transposed back (it holds one
  position, so that costs nothing)."""
  if hs == 0:
    return lambda weights, values: bind(e.eqn, [weights, values], params)
  (contract, batch) = params["dimension_numbers"]
  swapped = dict(params, dimension_numbers=((contract[1], contract[0]),
                                            (batch[1], batch[0])))
  n_batch = len(batch[0])
  n_values, n_weights = (a.ndim - len(c) - n_batch
                         for a, c in zip(e.in_avals, contract))
  perm = (list(range(n_batch)) +
          list(range(n_batch + n_weights, n_batch + n_weights + n_values)) +
          list(range(n_batch, n_batch + n_weights)))

  def run(weights, values):
    out, = bind(e.eqn, [weights, values], swapped)
    return [jnp.transpose(out, perm)]
  return run


def _why_weights_not_zero(h):
  if h.future.tainted:
    return ("it mixes attention scores over every position of the sequence "
            "and no causal mask removes the future positions (mask the "
            "logits with jnp.where(mask, logits, -1e9) before softmax)")
  return ("the attention weights at future positions are not provably zero "
          f"(they hold {h.future}): mask the logits with a large negative "
          "value such as -1e9 or -inf before softmax, not with 0")


