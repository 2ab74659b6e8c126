"""Loops of :mod:`scanagram.untile`: ``lax.map`` as its body vmapped, a
scan over key blocks as its iterations' additions vmapped and reduced
(:mod:`scanagram.untile.accumulations`), a map's loops that skip key
blocks read over all of them (:mod:`scanagram.untile.skipping`)."""
import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram import _jax_internals
from scanagram.untile import accumulations, skipping
from scanagram.untile.layout import REDUCE, pointwise, reduce_split
from scanagram.untile.values import Pending, Split, plain

def rewrite_scan(eqn, ins, changed, known_ins, evaluate):
  """A map (no carry), or a scan whose carries accumulate or are sums
  rescaled by a running maximum (:mod:`scanagram.accumulations`), as its
  body vmapped over the iterations and reduced; else None. A map's
  fori_loops that skip future key blocks become scans over all of them
  (:mod:`scanagram.skipping`)."""
  p = eqn.params
  n_consts, n_carry = p["num_consts"], p["num_carry"]
  body = p["jaxpr"]
  if n_carry == 0 and (skipping.fori_loops(body.jaxpr) or
                       skipping.window_slices(body.jaxpr)):
    # each operand's block size along axis 0; the queries' (the xs')
    operand_blocks = [next((x.shape[i] for o, i in x.pairs if o == 0), None)
                      if isinstance(x, Split) else None for x in ins]
    blocks = {b for b in operand_blocks[n_consts:] if b is not None}
    query_block = blocks.pop() if len(blocks) == 1 else None
    body = skipping.fori_as_scan(body, n_consts, known_ins, query_block,
                                 p["length"], operand_blocks)
    if isinstance(body, str):
      changed.why.append(body)
      return None
    sliced = skipping.slices_as_whole(body, n_consts, known_ins,
                                      query_block, p["length"],
                                      operand_blocks)
    if isinstance(sliced, str):
      changed.why.append(sliced)
      return None
    body = sliced.body
    if sliced.past is not None:
      changed.windows.append(sliced.past)
  forms = accumulations.carry_forms(body.jaxpr, n_consts, n_carry)
  consts = list(ins[:n_consts])
  init = ins[n_consts:n_consts + n_carry]
  xs = list(ins[n_consts + n_carry:])
  if forms is None or not xs:
    return None
  in_avals = [v.aval for v in eqn.invars]
  if accumulations.check_rescaled(body, forms, n_consts, n_carry,
                                  in_avals) is not None:
    return None
  rescaled = [f for f in forms if f.op == "rescaled"]
  accumulated = [f for f in forms if f.op != "rescaled"]
  skip = [e for f in forms for e in f.core]
  ys = list(body.jaxpr.outvars[n_carry:])

  # the accumulations and the outputs: no carry is read
  def first(consts, xs):
    env = _iteration_env(body, n_consts, n_carry, consts, xs, skip, {})
    return ([accumulations.apply_chain(f.out, _read(env, f.given))
             for f in accumulated] + [_read(env, y) for y in ys])
  outs = _vmapped(first, consts, xs, in_avals, n_consts, n_carry, (),
                  changed, evaluate)
  finals = {}
  acc_outs = outs[:len(accumulated)]
  for f, stacked in zip(accumulated, acc_outs):
    k = forms.index(f)
    finals[k] = _combine(f.op, init[k], _reduce_over_iterations(stacked, f.op))
  if rescaled:
    # every iteration at the final maxima, where the rescaling is 1
    maxima = [f for f in forms if f.op == "max"]
    final_maxima = [finals[forms.index(f)] for f in maxima]

    def second(consts, xs, maxima_now):
      seeds = {}
      for f, m in zip(maxima, maxima_now):
        view = accumulations.apply_chain(f.into, m)
        seeds[f.view] = view
        seeds[f.result] = view
      env = _iteration_env(body, n_consts, n_carry, consts, xs, skip, seeds)
      return [accumulations.apply_chain(f.out, _read(env, f.given))
              for f in rescaled]
    sums = _vmapped(second, consts, xs, in_avals, n_consts, n_carry,
                    final_maxima, changed, evaluate)
    for f, stacked in zip(rescaled, sums):
      k = forms.index(f)
      finals[k] = _combine("sum", init[k],
                           _reduce_over_iterations(stacked, "sum"))
  return [finals[k] for k in range(n_carry)] + list(outs[len(accumulated):])


def _read(env, v):
  return v.val if isinstance(v, jex_core.Literal) else env[v]


def _iteration_env(body, n_consts, n_carry, consts, xs, skip, seeds):
  """The values one iteration computes from its consts and xs (and
  ``seeds``), the equations reading a carry left out."""
  jaxpr = body.jaxpr
  env = dict(zip(jaxpr.constvars, body.consts))
  env.update(zip(jaxpr.invars[:n_consts], consts))
  env.update(zip(jaxpr.invars[n_consts + n_carry:], xs))
  env.update(seeds)
  skip = {id(e) for e in skip}
  for e in jaxpr.eqns:
    if id(e) in skip or any(v in env for v in e.outvars) or any(
        isinstance(v, jex_core.Var) and v not in env for v in e.invars):
      continue
    with _jax_internals.traced_as(e.source_info):
      outs = e.primitive.bind(*[_read(env, v) for v in e.invars],
                              **e.params)
    env.update(zip(e.outvars, outs if e.primitive.multiple_results
                   else [outs]))
  return env


def _vmapped(iteration, consts, xs, in_avals, n_consts, n_carry, extra,
             changed, evaluate):
  """``iteration(consts, xs, extra)`` vmapped over the xs' leading axis,
  traced and rewritten on the interpreter's values by ``evaluate``."""
  const_avals = in_avals[:n_consts]
  x_avals = in_avals[n_consts + n_carry:]
  extra_avals = [_aval(x) for x in extra]
  n_x = len(x_avals)

  def flat(*args):
    c = args[:n_consts]
    x = args[n_consts:n_consts + n_x]
    rest = args[n_consts + n_x:]
    return iteration(c, x, rest) if extra_avals else iteration(c, x)
  vmapped = jax.make_jaxpr(jax.vmap(
      flat, in_axes=(None,) * n_consts + (0,) * n_x +
      (None,) * len(extra_avals)))(
          *[jax.ShapeDtypeStruct(a.shape, a.dtype)
            for a in list(const_avals) + list(x_avals) + extra_avals])
  return evaluate(vmapped.jaxpr, vmapped.consts,
               list(consts) + list(xs) + list(extra), changed)


def _aval(x):
  if isinstance(x, (Split, Pending)):
    return jax.ShapeDtypeStruct(x.shape, _dtype(x))
  return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def _dtype(x):
  if isinstance(x, Pending):
    return _dtype(x.done)
  if isinstance(x, Split):
    return x.merged.dtype
  return jnp.result_type(x)


def _reduce_over_iterations(stacked, op):
  """``stacked`` reduced by ``op`` over its leading axis (the iterations)."""
  if isinstance(stacked, Pending):
    if stacked.axis == 0 and stacked.op == op:
      return stacked.done
    stacked = stacked.plain()
  if isinstance(stacked, Split):
    return reduce_split(stacked, (0,), op)
  return REDUCE[op].bind(stacked, axes=(0,), out_sharding=None)


def _combine(op, a, b):
  primitive = {"sum": P.add_p, "max": P.max_p, "min": P.min_p}[op]
  shape = a.shape if not isinstance(a, (Split, Pending)) else a.shape
  out = pointwise(primitive, {}, tuple(shape), [a, b])
  return out[0] if out is not None else primitive.bind(plain(a), plain(b))
