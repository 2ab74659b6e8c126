"""Key blocks skipped by a query block, for :mod:`scanagram.untile`.

Causal block-wise attention often visits, for query block i, only the key
blocks that can hold a key j <= i: a ``fori_loop(0, upper_i, ...)`` whose
upper bound comes from the block's query positions (the library's "causal
block skipping"). Over whole axes every query sees every key, so
:func:`fori_as_scan` rewrites such a loop into a ``scan`` over all N key
blocks, after checking on the query blocks' positions (constants known at
conversion time) that each skipped block lies wholly after the query
block's last position. A skipped block then holds only future keys: the
conversion's causality proof (future keys weigh exactly 0) makes its
contribution exactly 0, as skipping it does.
"""
from typing import Any, List, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram import _jax_internals
from scanagram.untile import accumulations

_INDEX_ARITHMETIC = {P.convert_element_type_p, P.lt_p, P.add_p, P.select_n_p}


def fori_loops(body) -> List[Any]:
  """The ``while`` equations of ``body`` (a Jaxpr) that are
  ``fori_loop(lower, upper, ...)``: the condition ``i < upper`` on the
  first two carries, the body returning ``i + 1`` and ``upper``."""
  found = []
  for e in body.eqns:
    if e.primitive is not P.while_p or e.params["cond_nconsts"]:
      continue
    cond = e.params["cond_jaxpr"].jaxpr
    inner = e.params["body_jaxpr"].jaxpr
    nb = e.params["body_nconsts"]
    if len(cond.eqns) != 1 or cond.eqns[0].primitive is not P.lt_p or (
        list(cond.eqns[0].invars) != list(cond.invars[:2])):
      continue
    i, upper = inner.invars[nb:nb + 2]
    if inner.outvars[1] is not upper:
      continue
    step = next((x for x in inner.eqns if x.outvars[0] is inner.outvars[0]),
                None)
    if step is None or step.primitive is not P.add_p or i not in step.invars:
      continue
    found.append(e)
  return found


def _indexed(inner, nb):
  """The ``dynamic_slice`` equations of a fori body that take element i of
  one of its consts along axis 0: ``[(const position, equation)]``."""
  i = inner.invars[nb]
  from_i = {i}
  for e in inner.eqns:
    if e.primitive in _INDEX_ARITHMETIC and any(
        isinstance(v, jex_core.Var) and v in from_i for v in e.invars):
      from_i.update(e.outvars)
  found = []
  for e in inner.eqns:
    if e.primitive is not P.dynamic_slice_p:
      continue
    operand, first, *rest = e.invars
    if first not in from_i or any(isinstance(v, jex_core.Var) and v in from_i
                                  for v in rest):
      continue
    if operand not in inner.invars[:nb] or e.params["slice_sizes"][0] != 1:
      return None
    found.append((inner.invars.index(operand), e))
  return found


def _block_size(body, var):
  """The size of the blocks of ``var`` (a map body's value ``[N, ..., b,
  ...]``): the reshape that split an axis into ``(N, b)`` on the way to it,
  through transposes."""
  producers = {v: e for e in body.eqns for v in e.outvars}
  n = var.aval.shape[0]
  while var in producers:
    e = producers[var]
    if e.primitive is P.transpose_p:
      var = e.invars[0]
      continue
    if e.primitive is P.reshape_p:
      sizes = e.params["new_sizes"]
      for d in range(len(sizes) - 1):
        if sizes[d] == n and d + 1 < len(sizes):
          return sizes[d + 1]
    return None
  return None


def fori_as_scan(body, n_consts, known, query_block, length,
                 operand_blocks) -> Union[Any, str]:
  """``body`` (a map's ClosedJaxpr) with each causal-skipping fori_loop as a
  scan over all key blocks, or why not (bounds not known at conversion
  time, blocks skipped before the diagonal, a block that holds a query's
  past skipped). ``known``: the map's operands' values
  (None where not known); ``query_block``: the map's query block size;
  ``length``: its iterations; ``operand_blocks``: each operand's block size
  along its axis 0 (None when it is not split into blocks there)."""
  loops = fori_loops(body.jaxpr)
  if not loops:
    return body
  if query_block is None:
    return "its queries are not one axis split into blocks"
  plans = {}
  for e in loops:
    nb = e.params["body_nconsts"]
    inner = e.params["body_jaxpr"].jaxpr
    indexed = _indexed(inner, nb)
    sizes = {e.invars[c].aval.shape[0] for c, _ in indexed or ()}
    if len(sizes) != 1:
      return ("its fori_loop over key blocks reads them other than as "
              "element i of arrays of blocks")
    n_blocks = sizes.pop()
    indexed_var = e.invars[indexed[0][0]]
    if indexed_var in body.jaxpr.invars:
      key_block = operand_blocks[body.jaxpr.invars.index(indexed_var)]
    else:
      key_block = _block_size(body.jaxpr, indexed_var)
    if key_block is None:
      return "its fori_loop reads arrays that are not split into blocks"
    plans[id(e)] = (indexed, n_blocks, key_block)
  # the loops' bounds for every query block, from the known values
  with jax.ensure_compile_time_eval():
    for it in range(length):
      env = _iteration_values(body, n_consts, known, it, loops)
      for e in loops:
        nb = e.params["body_nconsts"]
        bounds = [e.invars[nb + d] for d in (0, 1)]
        values = [_value(env, v) for v in bounds]
        if any(v is None for v in values):
          return ("the bounds of its fori_loop over key blocks are not "
                  "known at conversion time")
        lower, upper = (int(np.asarray(v)) for v in values)
        _, n_blocks, key_block = plans[id(e)]
        if lower != 0 or min(upper, n_blocks) * key_block < min(
            (it + 1) * query_block, n_blocks * key_block):
          visits = (f"visits key blocks {lower} to {upper - 1} only"
                    if upper > lower else "visits no key block")
          return (f"query block {it} {visits}, skipping keys at or before "
                  "its queries (only blocks wholly after a query block may "
                  "be skipped)")
  return _rewritten(body, loops, plans)


def _value(env, v):
  if isinstance(v, jex_core.Literal):
    return v.val
  return env.get(v)


def _rewritten(body, loops, plans):
  """``body`` with each loop in ``loops`` a scan over all key blocks."""
  loop_ids = {id(e) for e in loops}
  return _retraced(body, lambda e, ins: _loop_as_scan(e, ins, *plans[id(e)])
                   if id(e) in loop_ids else None)


def _retraced(body, replace):
  """``body`` traced again, ``replace(eqn, operands)`` giving an
  equation's outputs instead (None: the equation as it is)."""
  jaxpr = body.jaxpr

  def run(*args):
    env = dict(zip(jaxpr.constvars, body.consts))
    env.update(zip(jaxpr.invars, args))

    def read(v):
      return v.val if isinstance(v, jex_core.Literal) else env[v]
    for e in jaxpr.eqns:
      ins = [read(v) for v in e.invars]
      with _jax_internals.traced_as(e.source_info):
        outs = replace(e, ins)
        if outs is None:
          outs = e.primitive.bind(*ins, **e.params)
          outs = outs if e.primitive.multiple_results else [outs]
      env.update(zip(e.outvars, outs))
    return [read(v) for v in jaxpr.outvars]
  return jax.make_jaxpr(run)(*[jax.ShapeDtypeStruct(v.aval.shape,
                                                    v.aval.dtype)
                               for v in jaxpr.invars])


def _iteration_values(body, n_consts, known, it, skip):
  """What iteration ``it`` of a map computes from the operands' known
  values (the xs at ``it``), ``skip`` left out."""
  jaxpr = body.jaxpr
  seeds = dict(zip(jaxpr.constvars, body.consts))
  seeds.update((v, k) for v, k in zip(jaxpr.invars[:n_consts],
                                      known[:n_consts]) if k is not None)
  seeds.update((v, k[it]) for v, k in zip(jaxpr.invars[n_consts:],
                                          known[n_consts:]) if k is not None)
  return accumulations.evaluate(jaxpr, seeds, skip=skip)


def _loop_as_scan(e, ins, indexed, n_blocks, key_block):
  """A fori_loop equation as a scan over all ``n_blocks`` iterations, the
  consts it indexes by its counter read as the scan's xs."""
  nb = e.params["body_nconsts"]
  inner = e.params["body_jaxpr"]
  consts, (_, upper), carry = ins[:nb], ins[nb:nb + 2], ins[nb + 2:]
  xs = [consts[c] for c, _ in indexed]

  def iteration(carry, k_xs):
    k, blocks = k_xs
    seeds = dict(zip(inner.jaxpr.constvars, inner.consts))
    seeds.update(zip(inner.jaxpr.invars[:nb], consts))
    seeds[inner.jaxpr.invars[nb]] = k
    seeds[inner.jaxpr.invars[nb + 1]] = upper
    seeds.update(zip(inner.jaxpr.invars[nb + 2:], carry))
    for (_, eqn), block in zip(indexed, blocks):
      seeds[eqn.outvars[0]] = block[None]
    env = accumulations.evaluate(inner.jaxpr, seeds, skip=[x for _, x in
                                                           indexed])
    return [env[v] if isinstance(v, jex_core.Var) else v.val
            for v in inner.jaxpr.outvars[2:]], None
  final, _ = lax.scan(iteration, list(carry),
                      (jnp.arange(n_blocks, dtype=jnp.int32), xs))
  return [jnp.asarray(n_blocks, jnp.int32), upper] + list(final)


# -- key blocks sliced by a window ---------------------------------------------
def window_slices(body):
  """``dynamic_slice`` equations of ``body`` (a Jaxpr) that take a run of
  whole blocks along axis 0 from a start that is not a constant: a sliding
  window's key blocks for the query block."""
  found = []
  for e in body.eqns:
    if e.primitive is not P.dynamic_slice_p:
      continue
    operand, first, *rest = e.invars
    sizes = e.params["slice_sizes"]
    if (isinstance(first, jex_core.Var) and sizes[0] <= operand.aval.shape[0]
        and tuple(sizes[1:]) == tuple(operand.aval.shape[1:])
        and all(isinstance(v, jex_core.Literal) for v in rest)):
      found.append(e)
  return found


class Sliced:
  """A map body whose window slices of key blocks read all of them:
  ``body`` (the rewritten ClosedJaxpr) and ``past``: the smallest distance
  from a query to the newest key of a block skipped before its window, or
  None (nothing skipped before). The conversion must prove a window of at
  most ``past`` (every key that far back is masked)."""

  def __init__(self, body, past):
    self.body, self.past = body, past


def slices_as_whole(body, n_consts, known, query_block, length,
                    operand_blocks) -> Union[Sliced, str]:
  """``body`` (a map's ClosedJaxpr) with its window slices of key blocks
  (:func:`window_slices`) replaced by all the blocks, the scan reading them
  run over all of them; or why not."""
  jaxpr = body.jaxpr
  slices = window_slices(jaxpr)
  if not slices:
    return Sliced(body, None)
  if query_block is None:
    return "its queries are not one axis split into blocks"
  ids = {id(e) for e in slices}
  outs = {e.outvars[0]: e for e in slices}
  # every slice is read only as an xs of one scan
  readers = [e for e in jaxpr.eqns if any(v in outs for v in e.invars
                                          if isinstance(v, jex_core.Var))]
  if len(readers) != 1 or readers[0].primitive is not P.scan_p:
    return "its window slices of key blocks are read other than by one scan"
  scan = readers[0]
  first_x = scan.params["num_consts"] + scan.params["num_carry"]
  if any(v in outs for v in scan.invars[:first_x]) or any(
      v not in outs for v in scan.invars[first_x:]):
    return "its scan over key blocks reads other values than the slices"
  n_blocks = {e.invars[0].aval.shape[0] for e in slices}
  widths = {e.params["slice_sizes"][0] for e in slices}
  if len(n_blocks) != 1 or len(widths) != 1:
    return "its window slices differ in size"
  n_blocks, width = n_blocks.pop(), widths.pop()
  key_block = None
  for e in slices:
    var = e.invars[0]
    size = (operand_blocks[jaxpr.invars.index(var)] if var in jaxpr.invars
            else _block_size(jaxpr, var))
    key_block = key_block or size
  if key_block is None:
    return "its window slices take arrays that are not split into blocks"
  past = None
  with jax.ensure_compile_time_eval():
    for it in range(length):
      env = _iteration_values(body, n_consts, known, it, slices + [scan])
      starts = {_starts(env, e) for e in slices}
      if None in starts or len(starts) != 1:
        return ("the start of its window of key blocks is not known at "
                "conversion time")
      start = min(max(starts.pop(), 0), n_blocks - width)   # as clamped
      stop = start + width
      if stop < n_blocks and stop * key_block < (it + 1) * query_block:
        return (f"query block {it} reads key blocks {start} to {stop - 1}, "
                "skipping keys at or before its queries")
      if start > 0:
        distance = it * query_block - start * key_block + 1
        past = distance if past is None else min(past, distance)
  return Sliced(_whole(body, ids, scan, n_blocks), past)


def _starts(env, e):
  first = e.invars[1]
  value = first.val if isinstance(first, jex_core.Literal) else env.get(first)
  return None if value is None else int(np.asarray(value))


def _whole(body, slice_ids, scan, n_blocks):
  """``body`` with the slices reading whole operands and ``scan`` over all
  ``n_blocks``."""
  def replace(e, ins):
    if id(e) in slice_ids:
      return [ins[0]]
    if e is scan:
      return e.primitive.bind(*ins, **dict(e.params, length=n_blocks))
    return None
  return _retraced(body, replace)
