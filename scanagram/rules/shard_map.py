"""``jax.shard_map`` and the collectives in its body.

* ``shard_map`` whose ``in_specs`` and ``out_specs`` leave the scanned axis
  of every sequence unsplit: each device runs the same causal body on its
  part of the batch or features, so the body is converted per device (with
  the shapes it has there) and every block runs it inside ``shard_map`` over
  the same mesh. Its state is per device: it crosses the ``shard_map`` with
  a leading axis over the devices.
* Collectives over mesh axes (``psum``, ``pmax``, ``all_gather``,
  ``ppermute``, ``psum_scatter``, ``all_to_all``...) combine the devices'
  values position by position: pointwise along time, unless their own axis
  is the scanned one.
"""
import dataclasses

import jax
from jax.extend import core as jex_core
from jax.extend.core import primitives as P
from jax.sharding import PartitionSpec

from scanagram._jax_internals import (all_gather_invariant_p, pbroadcast_p,
                                      psum_invariant_p, pvary_p,
                                      reduce_scatter_p, shard_map_p)
from scanagram.interpreter import (Converted, bind, full_value, register,
                                   stateless)
from scanagram.kinds import UNSCANNED, History, is_scanned
from scanagram.rules.common import pointwise


def spec_str(spec) -> str:
  """``P(None, 'model')``, as the user writes it."""
  return "P(" + ", ".join(repr(p) for p in spec) + ")"


def _names_at(spec, axis):
  """The mesh axes ``spec`` splits dimension ``axis`` over (a tuple)."""
  entry = tuple(spec)[axis] if axis < len(spec) else None
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _moved(spec, axis, ndim):
  """``spec`` with the mesh axes at ``axis`` moved to the first unsplit
  other axis (the batch, usually), or dropped."""
  entries = list(spec) + [None] * (ndim - len(spec))
  names, entries[axis] = entries[axis], None
  free = [d for d in range(ndim) if d != axis and entries[d] is None]
  if free:
    entries[free[0]] = names
  return spec_str(entries)


def _check_spec(e, what, role, spec, kind, aval):
  """Refuses a spec that splits a sequence's scanned axis (or the key axis
  of attention scores)."""
  axes = [kind.axis] + ([kind.key_axis] if isinstance(kind, History) else [])
  for axis in axes:
    names = _names_at(spec, axis)
    if not names:
      continue
    over = " and ".join(repr(n) for n in names)
    raise e.refuse(
        f"shard_map's {what} {spec_str(spec)} for the {role} of shape "
        f"{tuple(aval.shape)} splits the scanned axis {axis} over {over}: a "
        "step holds one element along it, which cannot be split over "
        "devices, and a device would need the elements another holds. Split "
        f"the batch or feature axes instead (e.g. "
        f"{_moved(spec, axis, aval.ndim)}), or move the shard_map "
        "off the scanned path")


def _unchecked(jaxpr):
  """``jaxpr`` (nested ones too) as it runs with ``check_vma=False`` (see
  :func:`shard_map_rule`): ``psum_invariant`` as ``psum`` (it refuses
  operands not typed as varying) and without ``pvary`` (a cast of the type
  only, which would hide a mask's value from the attention rules)."""
  renamed = {}

  def atom(a):
    return a if isinstance(a, jex_core.Literal) else renamed.get(a, a)
  eqns, changed = [], False
  for eqn in jaxpr.eqns:
    if eqn.primitive is pvary_p:
      renamed.update(zip(eqn.outvars, map(atom, eqn.invars)))
      changed = True
      continue
    new = eqn
    if eqn.primitive is psum_invariant_p:
      new = eqn.replace(primitive=P.psum_p, params=dict(
          axes=eqn.params["axes"], axis_index_groups=None))
    params = {k: _unchecked_param(v) for k, v in new.params.items()}
    if eqn.primitive is shard_map_p:   # a nested one runs unchecked too
      params["check_vma"] = False
    if any(params[k] is not v for k, v in new.params.items()):
      new = new.replace(params=params)
    invars = [atom(a) for a in new.invars]
    if any(a is not b for a, b in zip(invars, new.invars)):
      new = new.replace(invars=invars)
    changed |= new is not eqn
    eqns.append(new)
  if not changed:
    return jaxpr
  return jaxpr.replace(eqns=eqns, outvars=[atom(a) for a in jaxpr.outvars])


def _unchecked_param(value):
  if isinstance(value, jex_core.Jaxpr):
    return _unchecked(value)
  if isinstance(value, jex_core.ClosedJaxpr):
    inner = _unchecked(value.jaxpr)
    return value if inner is value.jaxpr else jex_core.ClosedJaxpr(
        inner, value.consts)
  if isinstance(value, tuple) and any(
      isinstance(v, (jex_core.Jaxpr, jex_core.ClosedJaxpr)) for v in value):
    new = tuple(_unchecked_param(v) for v in value)
    return value if all(a is b for a, b in zip(new, value)) else new
  return value


@register(shard_map_p)
def shard_map_rule(e):
  """Causal when its body is and no spec splits the scanned axis: every
  device then holds whole sequences of its part of the other axes."""
  in_specs, out_specs = e.params["in_specs"], e.params["out_specs"]
  body = e.params["jaxpr"]
  for i, (k, spec) in enumerate(zip(e.in_kinds, in_specs)):
    if k is not UNSCANNED:
      _check_spec(e, "in_spec", "operand", spec, k, e.in_avals[i])
  n = len(e.in_kinds)
  known = e.known_thunks()
  # a device sees the whole of a replicated operand only: a known constant
  # split over devices is not what its body sees
  body_known = [known[i] if not any(_names_at(s, d) for d in range(len(s)))
                else (lambda: None) for i, s in enumerate(in_specs)]
  sub = e.convert(jex_core.ClosedJaxpr(_unchecked(body), ()), e.in_kinds,
                  body_known, [e.data(i) for i in range(n)])
  for j, (k, spec) in enumerate(zip(sub.out_kinds, out_specs)):
    if is_scanned(k) or isinstance(k, History):
      _check_spec(e, "out_spec", "output", spec, k, e.out_avals[j])

  mesh = e.params["mesh"]
  manual = e.params["newly_manual_axes"]
  # the state's leading axis: one slice per device
  state_spec = PartitionSpec(tuple(a for a in mesh.axis_names if a in manual))

  def advance(ctx, state, ins):
    present = [i for i, x in enumerate(ins) if x is not None]
    empty = state is None   # a fresh block, or a body without state
    # the block's traced position and count enter as operands: JAX cannot
    # close a shard_map over values typed with explicit mesh axes
    scalars = {f: getattr(ctx, f) for f in ("start", "count")
               if isinstance(getattr(ctx, f), jax.Array)}

    def per_device(state, scalars, values):
      inner = [None] * n
      for i, x in zip(present, values):
        inner[i] = x
      state = None if empty else jax.tree.map(lambda a: a[0], state)
      state, outs = sub.advance(dataclasses.replace(ctx, **scalars), state,
                                inner)
      return jax.tree.map(lambda a: a[None], state), tuple(outs)

    # check_vma=False: the body's values lose the replication facts the
    # trace had (a state is per device, so whatever is made from it is too);
    # the out_specs were checked in the training mode
    state, outs = jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(state_spec, PartitionSpec(),
                  tuple(in_specs[i] for i in present)),
        out_specs=(state_spec, tuple(out_specs)), axis_names=set(manual),
        check_vma=False)({} if empty else state, scalars,
                         tuple(full_value(ins[i]) for i in present))
    return (state if sub.stateful else None), list(outs)

  return Converted(sub.out_kinds, advance, sub.stateful, sub.blocks,
                   step_reads=tuple(sub.step_reads))


# -- collectives: position by position across devices ----------------------
# (``psum_invariant`` and ``pvary`` never reach a rule: the body is
# converted without them, see _unchecked)
@register(P.psum_p, P.pmax_p, P.pmin_p, P.ppermute_p, pbroadcast_p)
def collective_rule(e):
  """Combines the devices' elements at each position: causal. Each output
  keeps its operand's kind (an unscanned operand passes whole)."""
  return stateless(e.in_kinds, lambda ctx, ins: bind(e.eqn, ins))


def _refuse_along_time(e, axis, what):
  raise e.refuse(
      f"{what} along the scanned axis {axis}: each device's sequence would "
      "meet the others' at other positions. Gather or scatter along a batch "
      "or feature axis instead, or move the collective off the scanned path")


@register(P.all_gather_p, all_gather_invariant_p)
def all_gather_rule(e):
  """Causal unless tiled along the scanned axis (that concatenates the
  devices' sequences along time); untiled, it stacks them on a new axis."""
  axis = e.in_kinds[0].axis
  dim, tiled = e.params["all_gather_dimension"], e.params["tiled"]
  if tiled and dim == axis:
    _refuse_along_time(e, axis, "all_gather concatenates the devices' values")
  out = axis + (1 if not tiled and dim <= axis else 0)
  return pointwise(e, [axis], [out])


@register(reduce_scatter_p)
def reduce_scatter_rule(e):
  """``psum_scatter``: causal unless it scatters along the scanned axis."""
  axis = e.in_kinds[0].axis
  dim, tiled = e.params["scatter_dimension"], e.params["tiled"]
  if dim == axis:
    _refuse_along_time(e, axis, "psum_scatter splits the sum over devices")
  out = axis - (1 if not tiled and dim < axis else 0)
  return pointwise(e, [axis], [out])


@register(P.all_to_all_p)
def all_to_all_rule(e):
  """Causal unless it splits or concatenates along the scanned axis."""
  axis = e.in_kinds[0].axis
  if axis in (e.params["split_axis"], e.params["concat_axis"]):
    _refuse_along_time(e, axis, "all_to_all exchanges the devices' values")
  return pointwise(e, [axis], [axis])
