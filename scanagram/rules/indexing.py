"""Gather and scatter: indexing with arrays of indices.

A gather or scatter is causal when the scanned axis is carried through
unchanged: a whole window axis of the operand (``xs[:, idx]``), or a batch
axis that the operand and the indices share (``take_along_axis``), or a batch
axis of the indices alone (an embedding lookup ``table[ids]`` of scanned token
ids). Indexing *into* the scanned axis (``xs[idx]``, ``xs[::-1]`` as a
gather) picks positions of time chosen by the indices and is refused, unless
the window covers the whole axis (the start along it is then 0) or starts at
element 0 (``xs[:-2, idx]``: a truncated sequence).

The index vector is always the last axis of the indices (JAX's convention).
"""
import numpy as np
from jax.extend.core import primitives as P

from scanagram import _jax_internals, symbolic
from scanagram.interpreter import register
from scanagram.kinds import is_scanned
from scanagram.rules.common import only_scanned, pointwise, with_size


def _window_dims(ndim, *excluded):
  """The operand axes that are window (offset) axes, in order."""
  return [d for d in range(ndim) if not any(d in ex for ex in excluded)]


def _batch_out_dims(out_ndim, window_out_dims):
  """The output (or updates) axes fed by the indices' batch axes, in order of
  the indices' axes (the index vector, last, excluded)."""
  return [d for d in range(out_ndim) if d not in window_out_dims]


def _starts_at_zero(e, op_axis):
  """Whether every window of the gather starts at element 0 of the operand's
  ``op_axis``: it is not indexed, or its indices are constants that are 0
  there."""
  dn = e.params["dimension_numbers"]
  if op_axis not in dn.start_index_map:
    return True
  indices = e.known(1)
  if indices is None or isinstance(indices, symbolic.Unavailable):
    return False
  return bool(np.all(indices[..., dn.start_index_map.index(op_axis)] == 0))


def _check_axes(e, expected, why):
  """Refuses unless each scanned input runs along its ``expected`` axis."""
  for k, axis in zip(e.in_kinds, expected):
    if is_scanned(k) and k.axis != axis:
      raise e.refuse(why)


@register(P.gather_p)
def gather_rule(e):
  """Causal when the scanned axis is (a) a window axis of the operand taken
  whole or from its start, with unscanned indices, (b) a batch axis of the indices alone, with
  an unscanned operand, or (c) a batching axis shared by operand and indices.
  """
  only_scanned(e, "gather of attention scores is not supported")
  operand, indices = e.in_avals[:2]
  dn = e.params["dimension_numbers"]
  slice_sizes = e.params["slice_sizes"]
  windows = _window_dims(operand.ndim, dn.collapsed_slice_dims,
                         dn.operand_batching_dims)
  batch_out = _batch_out_dims(e.out_avals[0].ndim, dn.offset_dims)
  op_kind, ix_kind = e.in_kinds[:2]
  resize = None
  if is_scanned(ix_kind) and not (
      is_scanned(op_kind) and op_kind.axis in dn.operand_batching_dims):
    ix_axis = ix_kind.axis
    if ix_axis == indices.ndim - 1:
      raise e.refuse("its index vector runs along the scanned axis")
    if ix_axis in dn.start_indices_batching_dims:
      op_axis = dn.operand_batching_dims[
          dn.start_indices_batching_dims.index(ix_axis)]
    else:
      op_axis = None
      if is_scanned(op_kind):
        raise e.refuse(
            f"its operand is scanned along axis {op_kind.axis} and its "
            f"indices along axis {ix_axis}: the output would run along both")
    out_axis = batch_out[ix_axis]
  else:  # the operand is scanned
    op_axis = op_kind.axis
    size = operand.shape[op_axis]
    if op_axis in dn.operand_batching_dims:
      ix_axis = dn.start_indices_batching_dims[
          dn.operand_batching_dims.index(op_axis)]
      out_axis = batch_out[ix_axis]
    elif op_axis in dn.collapsed_slice_dims:
      raise e.refuse(
          f"it picks single elements along the scanned axis {op_axis} at "
          "positions given by its indices")
    elif slice_sizes[op_axis] != size and not _starts_at_zero(e, op_axis):
      raise e.refuse(
          f"it takes a window of {slice_sizes[op_axis]} of the {size} "
          f"elements along the scanned axis {op_axis}, not from its start")
    else:  # a whole window axis (its start, if indexed, is then 0), or the
      # first elements of it (``xs[:-2, idx]``): a truncated sequence
      ix_axis = None
      out_axis = dn.offset_dims[windows.index(op_axis)]
      _check_axes(e, [op_axis, None],
                  "its indices depend on the scanned input while the "
                  "operand is scanned along a window axis")

      def resize(params, n):
        return dict(params,
                    slice_sizes=with_size(params["slice_sizes"], op_axis, n))
  _check_axes(e, [op_axis, ix_axis],
              "its operand and indices are scanned along axes that do not "
              "line up")
  return pointwise(e, [op_axis, ix_axis], [out_axis], resize)


_SCATTERS = [P.scatter_p, P.scatter_add_p, P.scatter_mul_p, P.scatter_min_p,
             P.scatter_max_p, _jax_internals.scatter_sub_p]


@register(*_SCATTERS)
def scatter_rule(e):
  """Causal when the scanned axis of the operand (and the output) is (a) a
  window axis of the updates taken whole, with unscanned indices, or (b) a
  batching axis shared by operand, indices and updates. Updates written at
  positions of time chosen by the indices are refused."""
  only_scanned(e, "scatter into attention scores is not supported")
  if len(e.in_avals) != 3:
    raise e.refuse("scatter with several operands is not supported")
  operand, indices, updates = e.in_avals
  dn = e.params["dimension_numbers"]
  windows = _window_dims(operand.ndim, dn.inserted_window_dims,
                         dn.operand_batching_dims)
  update_batch = _batch_out_dims(updates.ndim, dn.update_window_dims)
  op_kind, ix_kind, up_kind = e.in_kinds

  # The operand axis that runs along time, found from whichever is scanned.
  if is_scanned(op_kind):
    op_axis = op_kind.axis
  elif is_scanned(up_kind):
    u = up_kind.axis
    if u in dn.update_window_dims:
      op_axis = windows[dn.update_window_dims.index(u)]
    else:
      b = update_batch.index(u)
      if b not in dn.scatter_indices_batching_dims:
        raise e.refuse(
            f"it writes element t of its updates (scanned along axis {u}) "
            "at positions given by its indices, not at position t")
      op_axis = dn.operand_batching_dims[
          dn.scatter_indices_batching_dims.index(b)]
  else:
    b = ix_kind.axis
    if b not in dn.scatter_indices_batching_dims:
      raise e.refuse("its indices depend on the scanned input: element t "
                     "chooses where to write")
    op_axis = dn.operand_batching_dims[
        dn.scatter_indices_batching_dims.index(b)]

  size = operand.shape[op_axis]
  if op_axis in dn.operand_batching_dims:
    ix_axis = dn.scatter_indices_batching_dims[
        dn.operand_batching_dims.index(op_axis)]
    up_axis = update_batch[ix_axis]
  elif op_axis in dn.inserted_window_dims:
    raise e.refuse(
        f"it writes single elements along the scanned axis {op_axis} at "
        "positions given by its indices")
  else:
    ix_axis = None
    up_axis = dn.update_window_dims[windows.index(op_axis)]
    if updates.shape[up_axis] != size:
      raise e.refuse(
          f"it writes a window of {updates.shape[up_axis]} of the {size} "
          f"elements along the scanned axis {op_axis}")
    if is_scanned(ix_kind):
      raise e.refuse("its indices depend on the scanned input: element t "
                     "chooses where to write")
  _check_axes(e, [op_axis, ix_axis, up_axis],
              "its operand, indices and updates are scanned along axes that "
              "do not line up")
  return pointwise(e, [op_axis, ix_axis, up_axis], [op_axis])
