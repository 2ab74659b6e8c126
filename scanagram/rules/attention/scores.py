"""Rules for equations on attention scores (History): elementwise ops follow
the future record, structure moves the rows and keys, reductions over the
keys need exact rows."""
import contextlib
from typing import Any, NamedTuple

import numpy as np
import jax.numpy as jnp
from jax.extend.core import primitives as P

from scanagram import symbolic
from scanagram._jax_internals import reshard_p
from scanagram.errors import ScanConversionError
from scanagram.interpreter import bind, register, time_block
from scanagram.kinds import TAINTED, UNSCANNED, History, is_scanned
from scanagram.rules import calls, elementwise, structural
from scanagram.rules.attention import masks
from scanagram.rules.attention.buffers import ring_positions
from scanagram.rules.attention.learning import ATTENTION
from scanagram.rules.attention.future import (
    Same, allows_reduction, future_region, on_scalars, operand_future,
    reduced_future, transfer)
from scanagram.rules.common import pointwise, with_size

def history_axes(e):
  kinds = [k for k in e.in_kinds if isinstance(k, History)]
  axes = {(k.axis, k.key_axis) for k in kinds}
  if len(axes) != 1:
    raise e.refuse(f"it combines attention scores laid out differently "
                   f"({sorted(axes)})")
  (axis, key_axis), = axes
  windows = {k.window for k in kinds}
  if len(windows) != 1:
    raise e.refuse("it combines attention scores with different windows")
  for k in e.in_kinds:
    if is_scanned(k) and k.axis != axis:
      # one value per key made from the data: a key-padding mask or bias
      per_key = (f" (their key axis {key_axis}): "
                 + masks.padding_mask("key-padding mask or bias")
                 if k.axis == key_axis else "")
      raise e.refuse("it combines attention scores with a sequence scanned "
                     f"along another axis{per_key}")
  ahead = min(k.ahead for k in e.in_kinds if k is not UNSCANNED)
  return History(axis, key_axis, ahead, TAINTED, windows.pop(),
                 kinds[0].origin)


def history_pointwise(e, h, future, resize=None):
  """Runs an equation on scores position by position. In a ring's step,
  unscanned operands over all keys are gathered at the slots' positions,
  but a band (one value inside the window, another outside, as a sliding
  window's mask is) is computed from the positions, so a state with no other
  length-L table steps on past L."""
  out = h.replace(future=future)
  size = e.out_avals[0].shape[h.key_axis]
  gathered = [i for i, (k, a) in enumerate(zip(e.in_kinds, e.in_avals))
              if k is UNSCANNED and a.ndim and a.shape[h.key_axis] == size
              and size > 1]
  operand_axes = elementwise.broadcast_operand_axes(e, h.axis)
  bands = {}
  if h.window is not None:
    bands = {i: band for i in gathered
             if operand_axes[i] is not None
             for band in [_band(e, i, h)] if band is not None}
  for i in bands:   # run slices them itself
    operand_axes[i] = None

  def run(ctx, ins, params):
    ins = list(ins)
    if ctx.fresh:
      for i in bands:
        ins[i] = time_block(ctx, ins[i], h.axis, h.ahead)
    elif h.window is not None:
      for i, band in bands.items():
        ins[i] = band.at(ctx, h, e.in_avals[i].shape)
      if rest:
        positions = ring_positions(ctx, h, size)
        for i in rest:
          ins[i] = jnp.take(ins[i], positions, axis=h.key_axis)
    return bind(e.eqn, ins, params)
  rest = [i for i in gathered if i not in bands]
  converted = pointwise(e, operand_axes, [h.axis] * len(e.out_avals), resize,
                        run=run, out_kinds=[out] * len(e.out_avals))
  # a table read at the ring's slots serves blocks of one only
  return converted._replace(blocks=h.window is None or not rest)


class _Band(NamedTuple):
  """A constant over (rows, keys) that is ``inside`` where ``0 <= i - j <
  window`` and ``outside`` elsewhere."""
  inside: Any
  outside: Any

  def at(self, ctx, h, shape):
    """Its rows in this block over the keys the ring gives them: in a step
    the ring's slots (a slot not yet filled holds no key of the window), in
    a longer block the ring in order of position then the block's own."""
    w, k = h.window, ctx.size
    first = ctx.start + h.ahead
    if ctx.is_step:
      keys = first - jnp.mod(first - jnp.arange(w), w)
    else:
      keys = first - w + jnp.arange(w + k)
    rows = first + jnp.arange(k)
    distance = (rows.reshape([k if d == h.axis else 1
                              for d in range(len(shape))]) -
                keys.reshape([keys.size if d == h.key_axis else 1
                              for d in range(len(shape))]))
    inside = (distance >= 0) & (distance < w) & (
        keys >= 0).reshape([keys.size if d == h.key_axis else 1
                            for d in range(len(shape))])
    value = jnp.where(inside, self.inside, self.outside)
    target = [k if d == h.axis else keys.size if d == h.key_axis else n
              for d, n in enumerate(shape)]
    return jnp.broadcast_to(value, target)


def _band(e, i, h):
  """Operand ``i`` as a :class:`_Band` for ``h``'s window, or None: a known
  constant of the operand's full shape that is one value at every (row, key)
  inside the window and another outside (checked at one point per piece of
  each row, see :func:`scanagram.symbolic.sweep`)."""
  values = e.known(i)
  shape = e.in_avals[i].shape
  if values is None or isinstance(values, symbolic.Unavailable) or \
      np.shape(values) != shape:
    return None
  values = symbolic.lift(values, shape, e.in_avals[i].dtype)
  within, beyond = Same(), Same()
  try:
    for points in symbolic.sweep(shape, h.axis, h.key_axis, [values],
                                 (h.window,)):
      idx = points.idx
      distance = idx[h.axis] - idx[h.key_axis]
      inside = (distance >= 0) & (distance < h.window)
      v = values.at(idx)
      within.add(v[points.valid & inside])
      beyond.add(v[points.valid & ~inside])
      if not (within.same and beyond.same):
        return None
  except symbolic.TooLarge:
    return None
  if within.value is None or beyond.value is None:
    return None
  return _Band(within.value, beyond.value)


@register(*[p for p in elementwise.ELEMENTWISE if p is not P.select_n_p],
          P.sharding_constraint_p, reshard_p, kind=History)
def elementwise_rule(e):
  """Elementwise ops on scores: position by position, so causal; the future
  record follows the op."""
  h = history_axes(e)
  region = future_region(e.out_avals[0].shape, h.axis, h.key_axis, h.window)
  futures = [operand_future(e, i, region) for i in range(len(e.in_kinds))]
  with _noting_refusal(e, h):
    future = masks.additive_mask(e, h, futures, region)
  if future is None:
    future = transfer(e.primitive.name, futures, on_scalars(e))
    if future.zero:
      masks.multiplicative_window(e, h, futures)
  return history_pointwise(e, h, future)



@register(P.select_n_p, kind=History)
def select_rule(e):
  """``jnp.where(mask, scores, fill)``: the mask must be known at conversion
  time; where it picks at a future key, the picked case must be exact there.
  Picking one constant at every future key makes the scores exact. Also
  records the window the mask proves (keys older than w picked as fill)."""
  h = history_axes(e)
  with _noting_refusal(e, h):
    future = masks.select_future(e, h)
  return history_pointwise(e, h, future)


@contextlib.contextmanager
def _noting_refusal(e, h):
  """Notes the score product whose mask was refused: converted again with
  its keys and queries swapped, the same mask may prove it causal."""
  try:
    yield
  except ScanConversionError:
    e.conversion.notes(ATTENTION).refused_masks.add(h.origin)
    raise


# -- structure and reductions on scores ---------------------------------------
@register(P.broadcast_in_dim_p, P.reshape_p, P.transpose_p, P.squeeze_p,
          kind=History)
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

  def run(ctx, ins, params):
    # the keys are as many as the block reads (a ring's w + k, not L)
    if key:
      params = dict(params, **{key: with_size(
          params[key], key_axis, ins[0].shape[h.key_axis])})
    return bind(e.eqn, ins, params)
  out = h.replace(axis=axis, key_axis=key_axis)
  return pointwise(e, [h.axis] + [None] * (len(e.in_avals) - 1), [axis],
                   resize if key else None, run=run, out_kinds=[out])


@register(P.reduce_sum_p, P.reduce_max_p, P.reduce_min_p, P.reduce_prod_p,
          P.argmax_p, P.argmin_p, kind=History)
def reduce_rule(e):
  """Over the key axis: causal when the rows' record allows the reduction
  (:func:`allows_reduction`: exact rows, a proven mask came first); the
  result is scanned. Over other axes: still scores (:func:`reduced_future`)."""
  h = e.in_kinds[0]
  ndim = e.in_avals[0].ndim
  axes = [d % ndim for d in e.params["axes"]]
  name = e.primitive.name
  if h.axis in axes:
    with _noting_refusal(e, h):   # perhaps k·qᵀ: the rows are the keys
      raise e.refuse(f"{name} reduces over the query positions of "
                     "attention scores")
  new_axis = h.axis - sum(d < h.axis for d in axes)
  if h.key_axis in axes:
    if h.future.tainted:
      raise e.refuse(
          f"{name} reduces over every position of the sequence (the keys of "
          "q·kᵀ) and no causal mask removes the future positions first")
    if not allows_reduction(h.future, name):
      raise e.refuse(
          f"{name} over the keys of scores masked by addition: their future "
          "entries are large and negative in both modes but not equal, so "
          "only a maximum (softmax's) may be taken over them")
    if not allows_reduction(h.future, name, h.window):
      raise e.refuse(f"{name} over a window's ring of keys would miss the "
                     "positions outside the window")
    return pointwise(e, [h.axis], [new_axis])
  new_key = h.key_axis - sum(d < h.key_axis for d in axes)
  out = h.replace(axis=new_axis, key_axis=new_key,
                  future=reduced_future(h.future, name))
  return pointwise(e, [h.axis], [new_axis], out_kinds=[out])


@register(P.jit_p, P.closed_call_p, P.custom_jvp_call_p, P.custom_vjp_call_p,
          P.remat_p, kind=History)
def call_rule(e):
  """Calls on scores convert their body (``jnp.where`` is a jit)."""
  return calls.call_rule(e)


