"""Attention: the key/value cache, derived and proven.

``q·kᵀ`` (a ``dot_general`` pairing every position of one sequence with every
position of another) is not causal by itself. Its rule keeps a buffer of the
keys (the operand as it enters the contraction) of length L and gives the
scores the kind ``History``: rows are scanned, the key axis holds all L
positions, and in prefill/step the keys after the newest element differ from
the training mode (``future=TAINTED``). The rules here follow that record
through the graph:

* a ``select_n`` (``jnp.where``) whose mask is known at conversion time and
  picks the same constant at every future key of every row makes the scores
  exact (``future`` = that constant);
* elementwise ops carry the record: a large negative constant minus a finite
  row maximum stays large and negative (``NEG``), ``exp`` of it is exactly 0,
  0 times or over a finite value is 0;
* a reduction over the keys (softmax's max and sum) accepts only exact rows;
* the contraction of the weights with values over the key axis keeps a
  buffer of the values and accepts only weights that are exactly 0 at every
  future key, so the unfilled part of the buffer cannot reach the output.

Anything else on scores is refused. The assumption behind ``NEG``: masked
logits are filled with a value below ``NEG_THRESHOLD`` (-1e4) and the row's
largest logit is more than ~100 above it, so ``exp`` underflows to 0 exactly,
as it does in the training mode.
"""
import numpy as np
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as P

from scanagram.interpreter import Converted, bind, register
from scanagram.kinds import (EXACT, NEG, TAINTED, UNSCANNED, History, Scanned,
                             is_scanned)
from scanagram.rules import calls, elementwise, structural
from scanagram.rules.common import DelayLine, pointwise, with_size
from scanagram.rules.linalg import _dot_out_axis

NEG_THRESHOLD = -1e4


# -- buffers ------------------------------------------------------------------
class Buffer:
  """The past elements of a scanned value along ``axis``, padded to its
  training length with zeros (finite, so 0 · unfilled = 0)."""

  def __init__(self, axis: int, size: int, ahead: int):
    self.axis, self.size, self.ahead = axis, size, ahead

  def prefill(self, x):
    widths = [(0, 0)] * x.ndim
    widths[self.axis] = (0, self.size - x.shape[self.axis])
    return jnp.pad(x, widths)

  def step(self, ctx, buf, x):
    return lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype),
                                           ctx.position + self.ahead,
                                           self.axis)


def is_attention_contraction(e) -> bool:
  """Both operands scanned, neither scanned axis contracted nor batched."""
  if not all(is_scanned(k) for k in e.in_kinds):
    return False
  (contract, batch) = e.params["dimension_numbers"]
  return all(k.axis not in contract[s] and k.axis not in batch[s]
             for s, k in enumerate(e.in_kinds))


def dot_general_rule(e):
  """``q·kᵀ``: rows of the lhs against every position of the rhs. The rhs
  joins a buffer; the scores are History with ``future=TAINTED``."""
  q, k = e.in_kinds
  dims = e.params["dimension_numbers"]
  ndims = [a.ndim for a in e.in_avals]
  kind = History(_dot_out_axis(dims, 0, q.axis, ndims),
                 _dot_out_axis(dims, 1, k.axis, ndims),
                 min(q.ahead, k.ahead), TAINTED)
  # rows may not run ahead of the keys: the buffer must hold every key <= row
  delay = DelayLine(q.axis, e.in_avals[0].shape[q.axis], k.ahead,
                    q.ahead - k.ahead) if q.ahead > k.ahead else None
  buffer = Buffer(k.axis, e.in_avals[1].shape[k.axis], k.ahead)

  def prefill(ctx, ins):
    qs, ks = ins
    queue = None
    if delay is not None:
      queue, qs = delay.prefill(ctx, qs)
    buf = buffer.prefill(ks)
    return (buf, queue), bind(e.eqn, [qs, buf])

  def step(ctx, state, ins):
    buf, queue = state
    qs, ks = ins
    if delay is not None:
      queue, qs = delay.step(queue, qs)
    buf = buffer.step(ctx, buf, ks)
    return (buf, queue), bind(e.eqn, [qs, buf])
  return Converted([kind], prefill, step, True)


@register(P.dot_general_p, history=True)
def weights_times_values_rule(e):
  """Weights (History) contracted over their key axis with a scanned value's
  time axis: causal when the weights are exactly 0 at every future key. The
  values join a buffer."""
  hs = 0 if isinstance(e.in_kinds[0], History) else 1
  vs = 1 - hs
  h, v = e.in_kinds[hs], e.in_kinds[vs]
  (contract, batch) = e.params["dimension_numbers"]
  if not is_scanned(v) or h.key_axis not in contract[hs] or v.axis not in (
      contract[vs]) or (contract[hs].index(h.key_axis) !=
                        contract[vs].index(v.axis)):
    raise e.refuse(
        "attention scores may only be contracted over their key axis with "
        "the time axis of a value sequence")
  if h.axis in contract[hs] or h.axis in batch[hs]:
    raise e.refuse("it contracts the query positions of attention scores")
  if h.future != 0.0 or h.future is TAINTED:
    raise e.refuse(_why_weights_not_zero(h))
  if v.ahead < h.ahead:
    raise e.refuse("its values run behind the attention rows")
  ndims = [a.ndim for a in e.in_avals]
  out_axis = _dot_out_axis((contract, batch), hs, h.axis, ndims)
  buffer = Buffer(v.axis, e.in_avals[vs].shape[v.axis], v.ahead)

  def ordered(weights, values):
    return [weights, values] if hs == 0 else [values, weights]

  def prefill(ctx, ins):
    buf = buffer.prefill(ins[vs])
    return buf, bind(e.eqn, ordered(ins[hs], buf))

  def step(ctx, buf, ins):
    buf = buffer.step(ctx, buf, ins[vs])
    return buf, bind(e.eqn, ordered(ins[hs], buf))
  return Converted([Scanned(out_axis, h.ahead)], prefill, step, True)


def _why_weights_not_zero(h):
  if h.future is TAINTED:
    return ("it mixes attention scores over every position of the sequence "
            "and no causal mask removes the future positions (mask the "
            "logits with jnp.where(mask, logits, -1e9) before softmax)")
  return ("the attention weights at future positions are not provably zero "
          f"(they hold {h.future}): mask the logits with a large negative "
          "value such as -1e9 or -inf before softmax, not with 0")


# -- what row i holds at its future keys j > i --------------------------------
def _future_region(shape, axis, key_axis):
  """Boolean array broadcastable to ``shape``: True where key j > row i."""
  rows = np.arange(shape[axis]).reshape(
      [-1 if d == axis else 1 for d in range(len(shape))])
  keys = np.arange(shape[key_axis]).reshape(
      [-1 if d == key_axis else 1 for d in range(len(shape))])
  return keys > rows


def _as_marker(value):
  value = float(value)
  return NEG if value <= NEG_THRESHOLD else value


def _operand_future(e, i, region):
  """What operand i holds at the future keys: TAINTED, EXACT, NEG, a float,
  or 'row' for a per-row (scanned) value."""
  kind = e.in_kinds[i]
  if isinstance(kind, History):
    return kind.future
  if is_scanned(kind):
    return "row"
  value = e.known(i)
  if value is None:
    return EXACT
  values = np.broadcast_to(value, np.broadcast_shapes(value.shape,
                                                      region.shape))
  picked = values[np.broadcast_to(region, values.shape)]
  if picked.size and np.all(picked == picked.flat[0]):
    return float(picked.flat[0])
  return EXACT


def _is_neg(f):
  return f is NEG or (isinstance(f, float) and f <= NEG_THRESHOLD)


def _combine_future(e, futures):
  """The output's future record from its operands' (elementwise ops)."""
  name = e.primitive.name
  if name in ("mul", "and") and any(f == 0.0 and not isinstance(f, str)
                                    for f in futures):
    return 0.0  # 0 times a finite value, in both modes
  if TAINTED in futures:
    return TAINTED
  if all(isinstance(f, float) for f in futures):
    scalars = [np.asarray(f, a.dtype) for f, a in zip(futures, e.in_avals)]
    out = bind(e.eqn, scalars, _scalar_params(e.params))[0]
    return _as_marker(out) if np.isfinite(out) or out < 0 else EXACT
  if name in ("sub", "add") and _is_neg(futures[0]) and not _is_neg(
      futures[1]) and futures[1] != float("inf"):
    return NEG
  if name == "add" and _is_neg(futures[1]) and not _is_neg(futures[0]):
    return NEG
  if name in ("exp", "exp2") and _is_neg(futures[0]):
    return 0.0
  if name == "div" and futures[0] == 0.0 and not isinstance(futures[0], str):
    return 0.0
  if name in ("stop_gradient", "copy", "reduce_precision", "name",
              "convert_element_type", "sharding_constraint") and (
                  futures[0] is NEG or futures[0] == 0.0):
    return futures[0]
  if name == "max" and all(_is_neg(f) for f in futures):
    return NEG
  return EXACT


def _scalar_params(params):
  return {k: v for k, v in params.items() if k != "sharding"}


def _history_axes(e):
  kinds = [k for k in e.in_kinds if isinstance(k, History)]
  axes = {(k.axis, k.key_axis) for k in kinds}
  if len(axes) != 1:
    raise e.refuse(f"it combines attention scores laid out differently "
                   f"({sorted(axes)})")
  (axis, key_axis), = axes
  for k in e.in_kinds:
    if is_scanned(k) and k.axis != axis:
      raise e.refuse("it combines attention scores with a sequence scanned "
                     "along another axis")
  return axis, key_axis, min(k.ahead for k in e.in_kinds
                             if k is not UNSCANNED)


@register(*[p for p in elementwise.ELEMENTWISE if p is not P.select_n_p],
          history=True)
def elementwise_rule(e):
  """Elementwise ops on scores: position by position, so causal; the future
  record follows the op."""
  axis, key_axis, ahead = _history_axes(e)
  shape = e.out_avals[0].shape
  region = _future_region(shape, axis, key_axis)
  futures = [_operand_future(e, i, region) for i in range(len(e.in_kinds))]
  futures = [EXACT if f == "row" else f for f in futures]
  future = _combine_future(e, futures)
  out = History(axis, key_axis, ahead, future)
  return pointwise(e, elementwise.broadcast_operand_axes(e, axis),
                   [axis] * len(e.out_avals), out_kinds=[out] * len(
                       e.out_avals))


@register(P.select_n_p, history=True)
def select_rule(e):
  """``jnp.where(mask, scores, fill)``: the mask must be known at conversion
  time; where it picks at a future key, the picked case must be exact there.
  Picking one constant at every future key makes the scores exact."""
  axis, key_axis, ahead = _history_axes(e)
  shape = e.out_avals[0].shape
  region = _future_region(shape, axis, key_axis)
  if e.in_kinds[0] is not UNSCANNED:
    raise e.refuse("its mask depends on the scanned input")
  mask = e.known(0)
  if mask is None:
    raise e.refuse(
        "its mask depends on an input of the function, so scanagram cannot "
        "check at conversion time that it removes the future positions")
  full = np.broadcast_shapes(mask.shape, region.shape)
  choice = np.broadcast_to(mask, full).astype(np.int64)
  future_mask = np.broadcast_to(region, full)
  picked = []
  for case in range(1, len(e.in_kinds)):
    where = future_mask & (choice == case - 1)
    if not where.any():
      continue
    f = _operand_future(e, case, region)
    if f is TAINTED:
      index = np.argwhere(where)[0]
      raise e.refuse(
          f"its mask keeps key {index[key_axis]} for query "
          f"{index[axis]}: a future position (a causal mask keeps key j for "
          "query i only when j <= i)")
    if isinstance(f, float) and e.known(case) is not None:
      value = np.broadcast_to(e.known(case), np.broadcast_shapes(
          e.known(case).shape, full))[where]
      f = float(value.flat[0]) if np.all(value == value.flat[0]) else EXACT
    picked.append(EXACT if f == "row" else f)
  if not picked:
    future = EXACT
  elif all(_is_neg(f) for f in picked):
    future = NEG if not all(isinstance(f, float) for f in picked) or len(
        set(picked)) > 1 else picked[0]
  elif all(isinstance(f, float) for f in picked) and len(set(picked)) == 1:
    future = picked[0]
  else:
    future = EXACT
  if isinstance(future, float):
    future = _as_marker(future) if future <= NEG_THRESHOLD else future
  out = History(axis, key_axis, ahead, future)
  return pointwise(e, elementwise.broadcast_operand_axes(e, axis), [axis],
                   out_kinds=[out])


# -- structure and reductions on scores ---------------------------------------
@register(P.broadcast_in_dim_p, P.reshape_p, P.transpose_p, P.squeeze_p,
          history=True)
def structural_rule(e):
  """Moves the rows and the key axis; causal when both stay whole axes."""
  h = e.in_kinds[0]
  name = e.primitive.name
  ndim = e.in_avals[0].ndim
  if name == "broadcast_in_dim":
    new = [e.params["broadcast_dimensions"][a] for a in (h.axis, h.key_axis)]
  elif name == "transpose":
    new = [list(e.params["permutation"]).index(a) for a in (h.axis,
                                                           h.key_axis)]
  elif name == "squeeze":
    dims = [d % ndim for d in e.params["dimensions"]]
    if h.axis in dims or h.key_axis in dims:
      raise e.refuse("it squeezes away an axis of the attention scores")
    new = [a - sum(d < a for d in dims) for a in (h.axis, h.key_axis)]
  else:
    new = [structural.reshape_out_axis(e.in_avals[0].shape, a,
                                       e.out_avals[0].shape)
           for a in (h.axis, h.key_axis)]
    if None in new or e.params.get("dimensions") is not None:
      raise e.refuse("it reshapes attention scores across their query or "
                     "key axis")
  axis, key_axis = new
  key = {"broadcast_in_dim": "shape", "reshape": "new_sizes"}.get(name)

  def resize(params, n):
    return dict(params, **{key: with_size(params[key], axis, n)})
  out = History(axis, key_axis, h.ahead, h.future)
  return pointwise(e, [h.axis] + [None] * (len(e.in_avals) - 1), [axis],
                   resize if key else None, out_kinds=[out])


@register(P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p,
          P.argmax_p, P.argmin_p, history=True)
def reduce_rule(e):
  """Over the key axis: causal when the rows are exact (a proven mask came
  first); the result is scanned. Over other axes: still scores."""
  h = e.in_kinds[0]
  ndim = e.in_avals[0].ndim
  axes = [d % ndim for d in e.params["axes"]]
  name = e.primitive.name
  if h.axis in axes:
    raise e.refuse(f"{name} reduces over the query positions of attention "
                   "scores")
  new_axis = h.axis - sum(d < h.axis for d in axes)
  if h.key_axis in axes:
    if h.future is TAINTED:
      raise e.refuse(
          f"{name} reduces over every position of the sequence (the keys of "
          "q·kᵀ) and no causal mask removes the future positions first")
    return pointwise(e, [h.axis], [new_axis])
  new_key = h.key_axis - sum(d < h.key_axis for d in axes)
  future = h.future if h.future in (TAINTED, 0.0) and name == (
      "reduce_sum") or h.future is TAINTED else EXACT
  out = History(new_axis, new_key, h.ahead, future)
  return pointwise(e, [h.axis], [new_axis], out_kinds=[out])


@register(P.jit_p, P.closed_call_p, P.custom_jvp_call_p, P.custom_vjp_call_p,
          P.remat_p, history=True)
def call_rule(e):
  """Calls on scores convert their body (``jnp.where`` is a jit)."""
  return calls.call_rule(e)
