"""The public entry points: ``to_step``, ``as_scan``, ``as_scan_with_prefill``.
"""
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from scanagram import _jax_internals, placement, untile
from scanagram import rules  # noqa: F401  (registers the rules)
from scanagram.errors import ScanConversionError, refusal
from scanagram.interpreter import (Block, Conversion, ConvertedJaxpr,
                                   DelayLine, convert_learning,
                                   recording_length_uses, time_block)
from scanagram.kinds import UNSCANNED, History, Scanned
from scanagram.rules.attention.learning import ATTENTION

Axes = Union[int, None, Sequence[Union[int, None]]]


class StepFunctions:
  """Functions that advance the state of a causal function (see
  :func:`to_step`): ``init``, ``prefill``, ``extend``, ``step``.

  Attributes:
    length: L, the length of the example along the scanned axis.
    max_length: L when the state needs it (a buffer of the past L positions,
      a table over L positions): positions >= L cannot be served. None when
      the state does not depend on L (RNN carries, convolution queues):
      the functions step on indefinitely.
    in_axes, out_axes, batch_axes, out_batch_axes, param_argnums: as given
      to :func:`to_step`.
  """

  def __init__(self, fun, example_args, in_axes, out_axes, batch_axes,
               out_batch_axes, param_argnums=None):
    self.fun = fun
    n = len(example_args)
    self.in_axes = _per_arg(in_axes, n, "in_axes")
    self.out_axes = out_axes
    self.batch_axes = (None if batch_axes is None else
                       _per_arg(batch_axes, n, "batch_axes"))
    self.out_batch_axes = out_batch_axes
    self._rows = self.batch_axes is not None
    if self._rows and out_batch_axes is None:
      raise ValueError("batch_axes needs out_batch_axes (the outputs' axis "
                       "of rows)")
    self._scanned_args = [i for i, a in enumerate(self.in_axes)
                          if a is not None]
    if not self._scanned_args:
      raise ValueError("to_step needs at least one scanned argument "
                       "(in_axes is None for all of them)")
    self._first_scanned = self._scanned_args[0]
    self.param_argnums = self._params(param_argnums, n)
    leaves, self._in_tree = jax.tree.flatten(list(example_args))
    self._in_specs = [placement.struct_of(x, dtype_of(x)) for x in leaves]
    self._leaf_axes, self._leaf_rows, self._leaf_args = [], [], []
    for i, arg in enumerate(example_args):
      for x in jax.tree.leaves(arg):
        self._leaf_args.append(i)
        axis = self.in_axes[i]
        rows = None if not self._rows else self.batch_axes[i]
        self._leaf_axes.append(None if axis is None else axis % np.ndim(x))
        self._leaf_rows.append(None if rows is None else rows % np.ndim(x))
    for spec, axis, rows in zip(self._in_specs, self._leaf_axes,
                                self._leaf_rows):
      if axis is not None and axis == rows:
        raise ValueError(f"an argument (shape {spec.shape}) has its batch "
                         f"axis {rows} equal to its scanned axis")
    lengths = {spec.shape[a] for spec, a in zip(self._in_specs,
                                                self._leaf_axes)
               if a is not None}
    if len(lengths) != 1:
      raise ValueError("the scanned inputs must share their length along the "
                       f"scanned axis; got lengths {sorted(lengths)}")
    self.length = lengths.pop()
    if self._rows:
      _check_rows_placement(self._in_specs)
    self._out_tree = None
    if self._rows:
      self._check_rows_independent()
    self._prefill_block = None   # set when the training mode is tiled
    self._convert()
    self._jit = {}
    self._carry_spec = None
    self._max_length = _UNKNOWN

  def _params(self, param_argnums, n):
    """The unscanned arguments that are parameters (see :func:`to_step`)."""
    if param_argnums is None:
      return frozenset()
    if isinstance(param_argnums, int):
      param_argnums = (param_argnums,)
    params = frozenset(i % n if -n <= i < n else i for i in param_argnums)
    for i in sorted(params):
      if not 0 <= i < n:
        raise ValueError(f"param_argnums names argument {i}; there are {n}")
      if self.in_axes[i] is not None:
        raise ValueError(f"param_argnums names argument {i}, which is "
                         f"scanned (in_axes {self.in_axes[i]}): parameters "
                         "are unscanned arguments")
      if self._rows and self.batch_axes[i] is not None:
        raise ValueError(f"param_argnums names argument {i}, which has rows "
                         f"(batch_axes {self.batch_axes[i]}): parameters "
                         "are shared by every row")
    return params

  # -- conversion ------------------------------------------------------------
  def _flat_fun(self, rows_removed: bool):
    """``fun`` on flat leaves; with ``rows_removed``, on one row (each leaf
    without its batch axis, outputs without theirs)."""
    def flat(*leaves):
      if rows_removed:
        leaves = [x if r is None else jnp.expand_dims(x, r)
                  for x, r in zip(leaves, self._leaf_rows)]
      out = self.fun(*jax.tree.unflatten(self._in_tree, leaves))
      out_leaves, self._out_tree = jax.tree.flatten(out)
      if rows_removed:
        out_leaves = [jnp.squeeze(y, self.out_batch_axes % jnp.ndim(y))
                      for y in out_leaves]
      return out_leaves
    return flat

  def _row_specs(self):
    """The example's leaves for one row (batch axes removed)."""
    return [s if r is None else placement.resized(s, r, None)
            for s, r in zip(self._in_specs, self._leaf_rows)]

  def _convert(self):
    if self._rows:
      specs = self._row_specs()
      self._time_axes = [None if a is None else a - (r is not None and r < a)
                         for a, r in zip(self._leaf_axes, self._leaf_rows)]
    else:
      specs, self._time_axes = self._in_specs, self._leaf_axes
    try:
      closed = _traced(self._flat_fun(self._rows), specs)
    except Exception as err:
      explicit = getattr(jax.sharding.get_abstract_mesh(), "explicit_axes",
                         ())
      if self._rows and explicit and "shard" in str(err).lower():
        # the user's code names a mesh axis on a batch of one row
        raise ValueError(_rows_placement_advice(
            f"explicit mesh axes {tuple(explicit)} in context, whose "
            f"shardings the function could not trace on one row ({err})")
        ) from err
      raise
    in_kinds = [UNSCANNED if a is None else Scanned(a)
                for a in self._time_axes]
    # the unscanned inputs that are data, not parameters: what is computed
    # from them with real work (an encoder) is computed once and carried.
    # With rows, those with rows; a value of parameters alone would be
    # copied per row.
    in_data = [a is None and (not self._rows or r is not None)
               and arg not in self.param_argnums
               for a, r, arg in zip(self._time_axes, self._leaf_rows,
                                    self._leaf_args)]
    def converter(closed):
      def convert(conversion):
        return ConvertedJaxpr(closed.jaxpr, closed.consts, in_kinds,
                              conversion=conversion, in_data=in_data)
      return convert
    try:
      self._converted = convert_learning(converter(closed), rows=self._rows)
    except ScanConversionError as refused:
      # block-wise (tiled) code converts over whole axes, or not at all:
      # then the refusal of the code as written stands
      untiled, blocks, why, window_at_most = untile.untile(closed)
      if untiled is None and why:
        raise ScanConversionError(
            f"{refused}\n(the function computes in blocks and was not "
            f"rewritten over whole axes: {'; '.join(why)})") from None
      if untiled is None:
        raise
      try:
        self._converted = convert_learning(converter(untiled),
                                           rows=self._rows)
      except ScanConversionError as whole:
        raise ScanConversionError(
            f"{whole}\n(the function computes in blocks: this refusal is "
            f"of it rewritten over whole axes; as written: {refused})"
        ) from None
      if window_at_most is not None:
        _check_skipped_window(self._converted, window_at_most, refused)
      closed = untiled
      # the query blocks of the training mode: a block that tiles L
      # (padded to at most one block more)
      tiling = [b for n, b in blocks if self.length <= n * b < self.length + b
                and n > 1]
      self._prefill_block = min(tiling, default=None)
    self._jaxpr = closed.jaxpr
    self._outputs = [self._output_rule(i, k, v) for i, (k, v) in
                     enumerate(zip(self._converted.out_kinds,
                                   closed.jaxpr.outvars))]

  def _check_rows_independent(self):
    """Refuses a function that mixes its rows: converted with the batch axis
    as the sequence axis, nothing may keep state or shift along it."""
    closed = _traced(self._flat_fun(False), self._in_specs)
    kinds = [UNSCANNED if r is None else Scanned(r) for r in self._leaf_rows]
    why = (f"with batch_axes={self.batch_axes} every row must be "
           "independent of the others, and ")
    conversion = Conversion()
    try:
      converted = ConvertedJaxpr(closed.jaxpr, closed.consts, kinds,
                                 conversion=conversion, once=False)
    except ScanConversionError as err:
      raise ScanConversionError(
          f"{why}this operation mixes rows (read 'scanned axis' as the batch "
          f"axis): {err}") from None
    for eqn, enclosing in conversion.carries_or_shifts:
      raise refusal(eqn, f"{why}it combines different rows along the batch "
                    "axis (batch statistics, attention or a scan across "
                    "rows, a shift along rows)", enclosing)
    for i, (kind, var) in enumerate(zip(converted.out_kinds,
                                        closed.jaxpr.outvars)):
      axis = self.out_batch_axes % max(len(var.aval.shape), 1)
      if isinstance(kind, History) or not isinstance(kind, Scanned) or (
          kind.axis != axis):
        raise self._refuse_output(
            closed.jaxpr, var,
            f"{why}output {i} (shape {var.aval.shape}) must have its rows "
            f"along out_batch_axes={self.out_batch_axes}; its kind along "
            f"rows is {kind}")

  def _output_rule(self, i, kind, var):
    aval = var.aval
    out_axis = self._out_time_axis(len(aval.shape))
    if kind is UNSCANNED:
      if len(aval.shape) == 0 or aval.shape[out_axis] != self.length:
        raise self._refuse_output(
            self._jaxpr, var,
            f"output {i} does not depend on the scanned input and has no "
            f"axis {self.out_axes} of length {self.length} to scan over "
            f"(shape {aval.shape})")
      return (out_axis, None)
    if isinstance(kind, History) and kind.exact_rows:
      # attention weights as an output: each row equals the training mode's
      # at every key, the future ones included
      kind = Scanned(kind.axis, kind.ahead)
    if not isinstance(kind, Scanned):
      why = f"output {i} depends on the whole sequence"
      origin = _find_eqn(self._jaxpr, getattr(kind, "origin", None))
      if origin is not None:  # attention scores with no causal mask
        raise refusal(origin, "it pairs every position of one sequence with "
                      "every position of another (an outer product over "
                      f"time) and no causal mask follows it; {why}")
      raise self._refuse_output(self._jaxpr, var, f"{why} ({kind})")
    if kind.axis != out_axis:
      raise self._refuse_output(
          self._jaxpr, var,
          f"output {i} (shape {aval.shape}) runs along its axis {kind.axis}, "
          f"not along out_axes={self.out_axes}: its elements along axis "
          f"{out_axis} are not positions of the sequence (for as_scan the "
          f"outputs' time axis must be 0; to_step takes out_axes="
          f"{kind.axis})")
    line = None
    if kind.ahead:
      line = DelayLine(kind.axis, aval.shape[kind.axis], 0, kind.ahead)
    return (kind.axis, line)

  def _out_time_axis(self, ndim):
    """The time axis of an output of the converted (per-row) function."""
    if not self._rows:
      return self.out_axes % max(ndim, 1)
    axis = self.out_axes % (ndim + 1)
    rows = self.out_batch_axes % (ndim + 1)
    return axis - (rows < axis)

  @staticmethod
  def _refuse_output(jaxpr, var, why):
    """A refusal naming the equation that made output ``var`` (and its
    source line), or a plain one when ``fun`` returns an input or a
    constant."""
    made_by = next((e for e in jaxpr.eqns
                    if any(o is var for o in e.outvars)), None)
    if made_by is None:
      return ScanConversionError(why)
    return refusal(made_by, why)

  # -- the functions ---------------------------------------------------------
  def init(self, *unscanned_args, batch_size: Optional[int] = None):
    """The carry before any element: ``init(*unscanned_args) -> carry``.

    With ``batch_axes``, the number of rows comes from an unscanned argument
    that has rows, else ``batch_size``, else the example.
    """
    n = len(self.in_axes) - len(self._scanned_args)
    if len(unscanned_args) != n:
      raise TypeError(f"init takes the {n} unscanned arguments; got "
                      f"{len(unscanned_args)}")
    args = self._with_empty_blocks(unscanned_args, batch_size)
    return self._compiled("prefill", 0, False)(None, *args)[0]

  def prefill(self, *args, lengths=None):
    """Runs the first P elements at once (0 <= P <= L).

    Args:
      *args: ``fun``'s arguments, the scanned ones with P elements along
        their axis.
      lengths: with ``batch_axes``, ``[B]`` ints: row b's prompt is its first
        ``lengths[b]`` elements (the rest is padding, its outputs are 0).
    Returns:
      ``(carry, outputs)``: ``fun``'s outputs for the P positions.
    """
    k = self._check_args(args, "prompt")
    lengths = self._check_lengths(lengths, args, k)
    self._check_room(None, k, lengths, "prefill")
    return self._compiled("prefill", k, lengths is not None)(
        lengths, *args)

  def extend(self, *args, lengths=None):
    """``extend(*unscanned, carry, *blocks, lengths=None) -> (carry, ys)``:
    advances ``carry`` by a block of k >= 1 elements (chunked prefill, the
    next turn of a chat, k drafted tokens to verify). Arguments are ordered
    as for :meth:`step`; ``ys`` are the outputs at those k positions, as
    ``lax.scan`` of :meth:`step` over the block gives them.

    ``lengths`` (with ``batch_axes``): ``[B]`` ints, row b advances by
    ``lengths[b]`` elements (0 allowed); outputs past them are 0.
    """
    carry, args = self._split_carry(args, "extend")
    self._check_carry(carry)
    k = self._check_args(args, "block")
    if k == 0:
      raise ValueError("extend takes blocks of at least one element")
    lengths = self._check_lengths(lengths, args, k)
    self._check_room(carry, k, lengths, "extend")
    return self._compiled("extend", k, lengths is not None)(
        carry, lengths, *args)

  def step(self, *args):
    """``step(*unscanned_args, carry, *elements) -> (carry, y)``: the carry
    goes just before the first scanned argument; each scanned argument is one
    element (its scanned axis removed), and so is ``y``."""
    carry, args = self._split_carry(args, "step")
    self._check_carry(carry)
    self._check_args(args, "element")
    self._check_room(carry, 1, None, "step")
    return self._compiled("step", 1, False)(carry, *args)

  def positions(self, carry):
    """The number of elements the carry has seen: an int32 scalar, or
    ``[B]`` with ``batch_axes``."""
    return carry["position"]

  @property
  def max_length(self) -> Optional[int]:
    if self._max_length is _UNKNOWN:
      # trace a step and see whether anything in it reads a length-L array
      # (None meanwhile: the traced step itself asks)
      self._max_length = None
      specs, carry = self._element_specs(), self.carry_spec()
      with recording_length_uses() as uses:
        jax.eval_shape(self._step, carry, *specs)
      self._max_length = self.length if uses else None
    return self._max_length

  # -- implementation --------------------------------------------------------
  def _compiled(self, what, k, ragged):
    key = (what, k, ragged)
    if key not in self._jit:
      if what == "prefill":
        fn = lambda lengths, *args: self._prefill(lengths, *args)  # noqa: E731
      elif what == "extend":
        fn = self._extend
      else:
        fn = self._step
      self._jit[key] = jax.jit(fn)
    return self._jit[key]

  def _prefill(self, lengths, *args):
    leaves = jax.tree.leaves(list(args))
    k = self._block_size(leaves)

    # A fresh block holds the elements the training mode has: a value
    # running ahead by a holds none past L. A state that serves past L
    # needs them, so the last a elements run as a block on the state.
    split = k
    if self.max_length is None:
      ahead = self._converted.conversion.max_ahead
      split = max(0, min(k, self.length - ahead))

    def run(_, count, *leaves):
      if split == k:
        return self._fresh_block(leaves, k, count)
      head = [x if a is None else lax.slice_in_dim(x, 0, split, axis=a)
              for x, a in zip(leaves, self._time_axes)]
      tail = [x if a is None else lax.slice_in_dim(x, split, k, axis=a)
              for x, a in zip(leaves, self._time_axes)]
      first = None if count is None else jnp.minimum(count, split)
      carry, ys = self._fresh_block(head, split, first)
      carry, last = self._run_block(
          carry, tail, k - split, None if count is None else count - first)
      return carry, [lax.concatenate([y, z], axis) for y, z, (axis, _) in
                     zip(ys, last, self._outputs)]
    carry, ys = self._per_row(run, lengths, leaves)
    return carry, jax.tree.unflatten(self._out_tree, ys)

  def _extend(self, carry, lengths, *args):
    leaves = jax.tree.leaves(list(args))
    k = self._block_size(leaves)

    def run(carry, count, *leaves):
      if k == 1 or self._converted.blocks:
        return self._run_block(carry, leaves, k, count)
      return self._run_steps(carry, leaves, k, count)
    carry, ys = self._per_row(run, lengths, leaves, carry)
    return carry, jax.tree.unflatten(self._out_tree, ys)

  def _step(self, carry, *args):
    leaves = jax.tree.leaves(list(args))

    def run(carry, count, *leaves):
      leaves = [x if a is None else jnp.expand_dims(x, a)
                for x, a in zip(leaves, self._time_axes)]
      carry, ys = self._run_block(carry, leaves, 1, None)
      return carry, [jnp.squeeze(y, axis) for y, (axis, _) in
                     zip(ys, self._outputs)]
    carry, ys = self._per_row(run, None, leaves, carry, element=True)
    return carry, jax.tree.unflatten(self._out_tree, ys)

  def _out_rows(self, element):
    """Each output's axis of rows (for vmap's out_axes); an element's has
    the time axis removed before it."""
    axes = []
    for var in self._jaxpr.outvars:
      ndim = len(var.aval.shape) + 1          # the per-row output, with rows
      rows = self.out_batch_axes % ndim
      time = self.out_axes % ndim
      axes.append(rows - (element and rows > time))
    return axes

  def _per_row(self, run, lengths, leaves, carry=None, element=False):
    """``run(carry, count, *leaves)`` on every row (vmapped) with
    batch_axes, else once. ``carry`` is None for a fresh block."""
    if not self._rows:
      return run(carry, None, *leaves)
    rows = [r if r is None or not element or a is None or r < a else r - 1
            for r, a in zip(self._leaf_rows, self._leaf_axes)]
    return jax.vmap(run, in_axes=(None if carry is None else 0,
                                  None if lengths is None else 0, *rows),
                    out_axes=(0, self._out_rows(element)))(carry, lengths,
                                                           *leaves)

  def _run_block(self, carry, leaves, k, count):
    """One row's block of k elements: ``(carry, outputs)``; a fresh block
    when ``carry`` is None."""
    fresh = carry is None
    if fresh:
      start, state, queues = 0, None, None
    else:
      state = dict(carry)
      start = state.pop("position")
      queues = state.pop("outputs", {})
    ctx = Block(start, k, count, fresh)
    state, outs = self._converted.advance(ctx, state, list(leaves))
    new_queues, ys = {}, []
    for i, (y, (axis, line)) in enumerate(zip(outs, self._outputs)):
      if line is not None:
        new_queues[i], y = line.advance(ctx, None if fresh else queues[i], y)
      elif self._converted.out_kinds[i] is UNSCANNED:
        y = time_block(ctx, y, axis)
      ys.append(self._masked(ctx, y, axis))
    if new_queues:
      state["outputs"] = new_queues
    position = jnp.asarray(start + ctx.advanced, jnp.int32)
    return dict(state, position=position), ys

  def _masked(self, ctx, y, axis):
    """0 at a row's padded elements; NaN at positions a bounded state cannot
    serve (>= L), never a plausible number."""
    k = y.shape[axis]
    index = jnp.arange(k).reshape([k if d == axis else 1
                                   for d in range(y.ndim)])
    if self.max_length is not None and jnp.issubdtype(y.dtype, jnp.inexact):
      y = jnp.where(ctx.start + index < self.max_length, y,
                    jnp.full_like(y, jnp.nan))
    if ctx.count is not None:
      y = jnp.where(index < ctx.count, y, jnp.zeros_like(y))
    return y

  def _fresh_block(self, leaves, k, count):
    """A fresh block of k elements. When the training mode computes in
    blocks of b queries (block-wise attention), a prompt longer than b runs
    so too: a fresh block of its first k - b (n - 1) elements, then n - 1
    blocks of b on the carry, so the prefill never holds more than b rows
    of scores, as training does not."""
    size = self._prefill_block
    if size is None or k <= size:
      return self._run_block(None, leaves, k, count)
    n = -(-k // size)
    first = k - size * (n - 1)

    def part(start, stop):
      return [x if a is None else lax.slice_in_dim(x, start, stop, axis=a)
              for x, a in zip(leaves, self._time_axes)]
    carry, ys = self._run_block(
        None, part(0, first), first,
        None if count is None else jnp.clip(count, 0, first))
    scanned = [i for i, a in enumerate(self._time_axes) if a is not None]
    # [..., (n - 1) * b, ...] -> [n - 1, ..., b, ...]
    rest = [jnp.moveaxis(x.reshape(x.shape[:a] + (n - 1, size) +
                                   x.shape[a + 1:]), a, 0)
            for x, a in zip(part(first, k), self._time_axes) if a is not None]

    def one(carry, i_xs):
      i, xs = i_xs
      block = list(leaves)
      for j, x in zip(scanned, xs):
        block[j] = x
      c = None if count is None else jnp.clip(count - first - i * size, 0,
                                               size)
      if self._converted.blocks:
        return self._run_block(carry, block, size, c)
      return self._run_steps(carry, block, size, c)
    carry, stacked = lax.scan(one, carry, (jnp.arange(n - 1), rest))
    # [n - 1, ..., b, ...] -> [..., (n - 1) * b, ...] after the first ys
    outs = []
    for y, z, (axis, _) in zip(ys, stacked, self._outputs):
      z = jnp.moveaxis(z, 0, axis)
      z = z.reshape(z.shape[:axis] + ((n - 1) * size,) + z.shape[axis + 2:])
      outs.append(lax.concatenate([y, z], axis))
    return carry, outs

  def _run_steps(self, carry, leaves, k, count):
    """A block as k steps (for rules that only run blocks of one)."""
    moved = [x if a is None else jnp.moveaxis(x, a, 0)
             for x, a in zip(leaves, self._time_axes)]
    scanned = [i for i, a in enumerate(self._time_axes) if a is not None]

    def one(carry, i_xs):
      i, xs = i_xs
      step_leaves = list(leaves)
      for j, x in zip(scanned, xs):
        step_leaves[j] = jnp.expand_dims(x, self._time_axes[j])
      new, ys = self._run_block(carry, step_leaves, 1, None)
      if count is not None:
        keep = i < count
        new = jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, carry)
        ys = [jnp.where(keep, y, jnp.zeros_like(y)) for y in ys]
      return new, ys
    carry, ys = lax.scan(one, carry, (jnp.arange(k),
                                      [moved[j] for j in scanned]))
    # ys: [k, ..., 1 at the time axis, ...] -> the time axis of length k
    return carry, [jnp.moveaxis(jnp.squeeze(y, axis + 1), 0, axis)
                   for y, (axis, _) in zip(ys, self._outputs)]

  def _block_size(self, leaves):
    return next(np.shape(x)[a] for x, a in zip(leaves, self._leaf_axes)
                if a is not None)

  def _element_specs(self):
    """ShapeDtypeStructs of the arguments of :meth:`step` after the carry."""
    specs = []
    for s, a in zip(self._in_specs, self._leaf_axes):
      specs.append(s if a is None else placement.resized(s, a, None))
    return jax.tree.unflatten(self._in_tree, specs)

  def _with_empty_blocks(self, unscanned_args, batch_size):
    """``fun``'s arguments with the given unscanned ones and scanned ones of
    no elements (with rows, the number of rows)."""
    examples = jax.tree.unflatten(self._in_tree, self._in_specs)
    rows = self._rows_of_unscanned(unscanned_args, batch_size)
    it = iter(unscanned_args)
    args = []
    for i, axis in enumerate(self.in_axes):
      if axis is None:
        args.append(next(it))
        continue
      row_axis = None if not self._rows else self.batch_axes[i]

      def empty(s, a=axis, r=row_axis):
        s = placement.resized(s, a % len(s.shape), 0)
        shape = list(s.shape)
        if r is not None:   # (the rows keep their placement)
          shape[r % len(shape)] = rows
        return placement.zeros(tuple(shape), s.dtype, like=s,
                               dim_of=range(len(shape)))
      args.append(jax.tree.map(empty, examples[i]))
    return args

  def _rows_of_unscanned(self, unscanned_args, batch_size):
    if not self._rows:
      return None
    unscanned = [i for i, a in enumerate(self.in_axes) if a is None]
    for i, arg in zip(unscanned, unscanned_args):
      r = self.batch_axes[i]
      if r is not None:
        leaf = jax.tree.leaves(arg)[0]
        return np.shape(leaf)[r % np.ndim(leaf)]
    if batch_size is not None:
      return batch_size
    spec, r = next((s, r) for s, r in zip(self._in_specs, self._leaf_rows)
                   if r is not None)
    return spec.shape[r]

  def _split_carry(self, args, what):
    k = self._first_scanned
    if len(args) != len(self.in_axes) + 1:
      raise TypeError(f"{what} takes {len(self.in_axes) + 1} arguments (the "
                      f"carry before argument {k}); got {len(args)}")
    return args[k], args[:k] + args[k + 1:]

  def _check_lengths(self, lengths, args, k):
    if lengths is None:
      return None
    if not self._rows:
      raise TypeError("lengths needs rows: pass batch_axes (and "
                      "out_batch_axes) to to_step")
    rows = self._num_rows(args)
    if isinstance(lengths, jax.core.Tracer):
      return lengths
    lengths = np.asarray(lengths)
    if lengths.shape != (rows,) or not np.issubdtype(lengths.dtype,
                                                     np.integer):
      raise ValueError(f"lengths must be [{rows}] integers (one per row); "
                       f"got {lengths.dtype} {lengths.shape}")
    if (lengths < 0).any() or (lengths > k).any():
      raise ValueError(f"lengths must lie in [0, {k}] (the block has {k} "
                       f"elements); got {lengths.tolist()}")
    return jnp.asarray(lengths, jnp.int32)

  def _num_rows(self, args):
    for x, r in zip(jax.tree.leaves(list(args)), self._leaf_rows):
      if r is not None:
        return np.shape(x)[r]
    return None

  def _check_room(self, carry, k, lengths, what):
    """Eagerly, a ValueError before a position >= L (max_length) would be
    computed; under jit the outputs there are NaN instead."""
    if carry is None:
      self.check_room(np.zeros((), np.int64), k, lengths, what)
    elif not isinstance(carry["position"], jax.core.Tracer):
      self.check_room(np.asarray(carry["position"]), k, lengths, what)

  def check_room(self, positions, k, lengths=None, what="this call"):
    """Raises ValueError when advancing rows at ``positions`` (host ints,
    scalar or ``[B]``) by ``k`` elements (by ``lengths`` per row) would
    compute a position the state cannot serve (>= max_length)."""
    limit = self.max_length
    if limit is None or isinstance(lengths, jax.core.Tracer):
      return
    end = np.asarray(positions) + (k if lengths is None
                                   else np.asarray(lengths))
    if (end > limit).any():
      at = f" (row {int(np.argmax(end > limit))})" if np.ndim(end) else ""
      raise ValueError(
          f"{what}: this would compute position {int(np.max(end)) - 1}{at}, "
          f"but the state holds L={limit} positions (0 to {limit - 1}): its "
          "buffers or tables have the length of the example given to "
          "to_step. Convert with a longer example to serve longer "
          "sequences.")

  def _check_args(self, args, what):
    """Checks structure, shapes and dtypes of a ``prompt`` (at most L
    elements), a ``block`` or an ``element``; returns the block size k."""
    if len(args) != len(self.in_axes):
      raise TypeError(f"expected {len(self.in_axes)} arguments, got "
                      f"{len(args)}")
    leaves, tree = jax.tree.flatten(list(args))
    if tree != self._in_tree:
      raise TypeError(f"arguments have structure {tree}; expected "
                      f"{self._in_tree}")
    ks, rows = set(), set()
    for (path, x), spec, axis, row in zip(
        jax.tree_util.tree_flatten_with_path(list(args))[0], self._in_specs,
        self._leaf_axes, self._leaf_rows):
      name = "argument" + jax.tree_util.keystr(path)
      shape, want = tuple(np.shape(x)), list(spec.shape)
      if axis is not None and what == "element":
        del want[axis]
        if row is not None and row > axis:
          row -= 1
      if len(shape) == len(want):
        if row is not None:
          rows.add(shape[row])
          want[row] = shape[row]
        if axis is not None and what != "element":
          ks.add(shape[axis])
          if shape[axis] > self.length and what == "prompt":
            # (a longer block on a state that needs no L is fine)
            raise ValueError(
                f"{name}: the prompt has {shape[axis]} elements along axis "
                f"{axis}, more than L={self.length}: it would compute "
                f"position {shape[axis] - 1} (prefill up to L, then extend)")
          want[axis] = shape[axis]
      if shape != tuple(want):
        raise ValueError(f"{name}: expected shape {tuple(want)}, got {shape}")
      if dtype_of(x) != dtype_of(spec):
        raise TypeError(f"{name}: expected dtype {spec.dtype}, got "
                        f"{dtype_of(x)}")
    if len(ks) > 1:
      raise ValueError("the scanned arguments must have the same number of "
                       f"elements along their scanned axes; got {sorted(ks)}")
    if len(rows) > 1:
      raise ValueError("the arguments must have the same number of rows "
                       f"along their batch axes; got {sorted(rows)}")
    return ks.pop() if ks else 1

  def carry_spec(self):
    """The carry's structure, shapes and dtypes (ShapeDtypeStructs)."""
    if self._carry_spec is None:
      examples = jax.tree.unflatten(self._in_tree, self._in_specs)
      unscanned = [a for a, ax in zip(examples, self.in_axes) if ax is None]
      args = self._with_empty_blocks(unscanned, None)
      self._carry_spec = jax.eval_shape(
          lambda *a: self._prefill(None, *a)[0], *args)
    return self._carry_spec

  def _check_carry(self, carry):
    spec = self.carry_spec()
    got, want = jax.tree.structure(carry), jax.tree.structure(spec)
    if got != want:
      raise TypeError(f"the carry has structure {got}; expected {want}")
    for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(carry)[0],
                            jax.tree.leaves(spec)):
      name = "carry" + jax.tree_util.keystr(path)
      shape = tuple(np.shape(x))
      want = s.shape if not self._rows else shape[:1] + s.shape[1:]
      if shape != want:
        raise ValueError(f"{name}: expected shape {want}, got {shape}")
      if dtype_of(x) != s.dtype:
        raise TypeError(f"{name}: expected dtype {s.dtype}, got "
                        f"{dtype_of(x)}")


_UNKNOWN = object()


def _check_skipped_window(converted, at_most, refused):
  """Key blocks skipped before a query block's window hold keys at least
  ``at_most`` back: the rewrite that reads them too holds when every mask
  proves a window of at most that (those keys weigh exactly 0)."""
  notes = converted.conversion.notes(ATTENTION)
  # a window proven in this conversion, or given to it as a ring
  windows = [notes.facts.rings.get(p, notes.windows.get(p))
             for p in notes.score_products]
  if not windows or None in windows or max(windows) > at_most:
    raise ScanConversionError(
        f"{refused}\n(the function computes in blocks and skips key blocks "
        f"{at_most} or more positions back from a query, which its masks do "
        f"not remove (the windows they prove: {windows}): mask the keys "
        "outside the window as well, e.g. `q - k < window` in the mask)")


def _check_rows_placement(specs):
  """Rows are converted one at a time (the step vmapped over them), which
  JAX's explicit mesh axes cannot type: a row has no batch axis to place."""
  for spec in specs:
    named = placement.explicit_spec(spec)
    if named is not None:
      raise ValueError(_rows_placement_advice(
          f"an example placed on explicit mesh axes ({named})"))


def _rows_placement_advice(where: str) -> str:
  return (f"batch_axes (a position per row) with {where}: the rows are "
          "converted one at a time, and a sharding type that splits or names"
          " the batch cannot hold for one row. Place the examples on a mesh "
          "with automatic axes (jax.make_mesh(..., axis_types=(AxisType.Auto,"
          ") * n)), where XLA partitions the rows and the caches as the "
          "inputs are placed, or convert without batch_axes (one position "
          "for all rows)")


def _traced(flat_fun, specs):
  """The jaxpr of ``flat_fun`` without dead code: what no output needs (a
  value read only for its shape) is never converted, so never refused."""
  closed = jax.make_jaxpr(flat_fun)(*specs)
  return closed.replace(jaxpr=_jax_internals.without_dead_code(closed.jaxpr))


def _find_eqn(jaxpr, eqn_id):
  """The equation with ``id(eqn) == eqn_id`` in ``jaxpr`` or its sub-jaxprs,
  or None."""
  if eqn_id is None:
    return None
  for eqn in jaxpr.eqns:
    if id(eqn) == eqn_id:
      return eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jex_core.Jaxpr):
          found = _find_eqn(sub, eqn_id)
          if found is not None:
            return found
  return None


def dtype_of(x):
  """``x``'s dtype as JAX has it; a PRNG key's as it is (``jnp.dtype``
  cannot interpret it)."""
  dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
  if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
    return dtype
  return jnp.dtype(dtype)


def _per_arg(axes, n, name):
  if isinstance(axes, (list, tuple)):
    if len(axes) != n:
      raise ValueError(f"{name} has {len(axes)} entries for {n} arguments")
    return tuple(axes)
  return (axes,) * n


def to_step(fun: Callable, *example_args, in_axes: Axes = 0,
            out_axes: int = 0, batch_axes: Axes = None,
            out_batch_axes: Optional[int] = None,
            param_argnums: Union[int, Sequence[int], None] = None
            ) -> StepFunctions:
  """Derives the functions that advance the state of a causal function.

  Args:
    fun: a function causal along the scanned axis of its scanned arguments:
      ``fun(*args)[:t]`` depends only on the first t elements.
    *example_args: arrays or ``jax.ShapeDtypeStruct`` pytrees fixing the
      structure, shapes, dtypes and the length L.
    in_axes: like ``jax.vmap``'s: for each argument, the axis it is scanned
      along, or None for an argument that is not scanned (parameters, model
      state). Unscanned arguments are inputs of the derived functions, so one
      compiled step serves every parameter value. What takes real work to
      compute from them (an encoder's output, cross-attention keys and
      values) is computed once, by ``init`` or ``prefill``, and carried:
      later calls must get the unscanned arguments the carry was made with.
      Work on parameters alone (a weight normalisation) is redone in each
      call instead, never copied into the carry: the parameters are the
      arguments named in ``param_argnums`` and, with ``batch_axes``, the
      unscanned ones without rows.
    out_axes: the axis along which ``fun``'s outputs run in time (as in
      ``fun``'s own outputs; an output whose time axis is elsewhere is
      refused). A step output has it removed.
    batch_axes: like ``jax.vmap``'s ``in_axes``: for each argument its axis
      of independent rows, or None (parameters). With it every row has its
      own position, and ``prefill``/``extend`` take per-row ``lengths``. A
      function that mixes rows is refused.
    out_batch_axes: the outputs' axis of rows (needed with ``batch_axes``).
    param_argnums: the unscanned arguments that are parameters (weights,
      model state), as opposed to data (an encoder's source sequence). What
      is computed from parameters alone is never carried.

  Returns:
    A :class:`StepFunctions` with ``init(*unscanned)``, ``prefill(*args)``,
    ``extend(*unscanned, carry, *blocks)``, ``step(*unscanned, carry,
    *elements)`` and ``positions(carry)``.

  Raises:
    ScanConversionError: an operation in ``fun`` is not causal along the
      scanned axis, or (with ``batch_axes``) mixes rows; the message names
      it and its source line.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> def model(w, xs):                       # xs: [T, D]
    ...   return jnp.cumsum(xs @ w, axis=0)
    >>> fns = to_step(model, jnp.ones((3, 3)), jnp.ones((8, 3)),
    ...               in_axes=(None, 0))
    >>> carry = fns.init(jnp.eye(3))
    >>> carry, y = fns.step(jnp.eye(3), carry, jnp.ones(3))
    >>> y.tolist()
    [1.0, 1.0, 1.0]
    >>> carry, ys = fns.extend(jnp.eye(3), carry, jnp.ones((2, 3)))
    >>> ys[:, 0].tolist(), int(fns.positions(carry))
    ([2.0, 3.0], 3)
  """
  return StepFunctions(fun, example_args, in_axes, out_axes, batch_axes,
                       out_batch_axes, param_argnums)


def as_scan(fun: Callable, example_xs):
  """``(step, carry_init)`` with ``lax.scan(step, carry_init, xs)[1] ==
  fun(xs)``, for a function causal along axis 0 of ``xs``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> step, init = as_scan(lambda xs: jnp.cumsum(xs, 0), jnp.ones((4, 2)))
    >>> jax.lax.scan(step, init, jnp.ones((4, 2)))[1][:, 0].tolist()
    [1.0, 2.0, 3.0, 4.0]
  """
  fns = to_step(fun, example_xs)
  return fns.step, fns.init()


def as_scan_with_prefill(fun: Callable, example_xs, prefill):
  """``(step, carry, out_prefill)``: ``out_prefill == fun(xs)[:P]`` for a
  prompt ``prefill`` of length P, and stepping ``xs[P:]`` from ``carry``
  gives ``fun(xs)[P:]``."""
  fns = to_step(fun, example_xs)
  carry, out = fns.prefill(prefill)
  return fns.step, carry, out
