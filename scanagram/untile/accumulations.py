"""What a scan's carries do per iteration, for :mod:`scanagram.untile`.

A scan over key blocks keeps running values. Each carry ``c`` of such a
body is one of (``A`` and ``B`` are reshapes or transposes that undo each
other, the carry seen in another layout inside the body, as einops writes
it):

* an **accumulation**: ``c' = B(A(c) + t)`` (or ``max``, ``min``), ``t``
  read from no carry: the final carry is ``c0 + Σ B(t)`` over the
  iterations;
* a **rescaled sum**: ``c' = B(a · A(c) + g)`` where ``a`` and ``g`` read
  the running maxima (``m`` before and ``m'`` after the iteration) and no
  other carry: the online softmax, ``a = exp(m - m')``, ``g = Σ exp(s -
  m')``. With every iteration run at the final maximum ``M`` the final
  carry is ``c0 + Σ B(g(M))``, when ``a(m, m) = 1``, ``a(m1, m2) a(m2, m3)
  = a(m1, m3)`` and ``a(m1, m2) g(m1) = g(m2)``: :func:`check_rescaled`
  tests these identities on random values of one iteration.
"""
import dataclasses
from typing import Any, List, Optional

import jax
import numpy as np
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

_ACCUMULATE = {P.add_p: "sum", P.max_p: "max", P.min_p: "min"}
_LAYOUT = {P.reshape_p, P.transpose_p, P.squeeze_p, P.broadcast_in_dim_p}


@dataclasses.dataclass
class CarryForm:
  """One carry: ``op`` ("sum", "max", "min" or "rescaled"); ``into``: the
  layout equations from the carry to ``view`` (what the core reads);
  ``core``: the equations of the update; ``out``: the layout equations from
  the core's result to the new carry; ``given``: what one iteration adds
  (``t``, or ``g``); ``scale``: ``a`` of a rescaled sum."""
  op: str
  view: Any
  into: List[Any]
  core: List[Any]
  out: List[Any]
  given: Any
  scale: Any = None

  @property
  def result(self):
    return self.core[-1].outvars[0]


def carry_forms(body, n_consts: int, n_carry: int) -> Optional[List[CarryForm]]:
  """The form of each carry of a scan body (a Jaxpr), or None when one has
  no form above or an iteration's additions read a carry they may not."""
  carries = body.invars[n_consts:n_consts + n_carry]
  producers = {v: e for e in body.eqns for v in e.outvars}
  uses = {}
  for e in body.eqns:
    for v in e.invars:
      if isinstance(v, jex_core.Var):
        uses.setdefault(v, []).append(e)
  forms = []
  for c, new in zip(carries, body.outvars[:n_carry]):
    view, into = _follow_into(c, uses)
    result, out = _follow_out(new, producers, uses, body.outvars)
    form = _core(view, result, producers, uses)
    if form is None:
      return None
    op, core, given, scale = form
    if not _undo(into, out, c.aval):
      return None
    forms.append(CarryForm(op, view, into, core, out, given, scale))
  return forms if _reads_allowed(body, carries, forms) else None


def apply_chain(chain, x):
  """The layout equations ``chain`` applied to ``x``."""
  for e in chain:
    x = e.primitive.bind(x, **e.params)
  return x


def _undo(into, out, aval) -> bool:
  """Whether the layout chain ``out`` undoes ``into`` (checked on the
  positions of the carry's elements)."""
  if not into and not out:
    return True
  positions = np.arange(int(np.prod(aval.shape)),
                        dtype=np.int32).reshape(aval.shape)
  with jax.ensure_compile_time_eval():
    try:
      back = np.asarray(apply_chain(out, apply_chain(into, positions)))
    except Exception:   # the chains do not fit together
      return False
  return back.shape == positions.shape and bool((back == positions).all())


def _is_layout(e):
  if e.primitive not in _LAYOUT:
    return False
  if e.primitive is P.reshape_p and e.params.get("dimensions") is not None:
    return False
  a, b = e.invars[0].aval, e.outvars[0].aval
  return len(e.invars) == 1 and np.prod(a.shape) == np.prod(b.shape)


def _follow_into(c, uses):
  view, chain = c, []
  while len(uses.get(view, ())) == 1 and _is_layout(uses[view][0]):
    chain.append(uses[view][0])
    view = chain[-1].outvars[0]
  return view, chain


def _follow_out(new, producers, uses, outvars):
  """The update's result before the layout equations that make the new
  carry of it (a running maximum's result may be read elsewhere too)."""
  result, chain = new, []
  while (isinstance(result, jex_core.Var) and result in producers
         and _is_layout(producers[result])):
    if chain and (len(uses.get(result, ())) != 1 or result in outvars):
      break   # a value between two layout equations read elsewhere
    e = producers[result]
    chain.insert(0, e)
    result = e.invars[0]
  if chain and result in outvars:
    return new, []
  return result, chain


def _same(v, producers):
  """``v`` without identity conversions (``jnp.maximum`` converts its
  operands to the dtype they have)."""
  while isinstance(v, jex_core.Var) and v in producers:
    e = producers[v]
    if e.primitive is not P.convert_element_type_p or (
        e.invars[0].aval.dtype != v.aval.dtype):
      break
    v = e.invars[0]
  return v


def _core(view, result, producers, uses):
  """``(op, core equations, given, scale)`` or None."""
  e = producers.get(result)
  if e is None:
    return None
  reads = [_same(v, producers) for v in e.invars]
  others = [v for v, r in zip(e.invars, reads) if r is not view]
  if e.primitive in _ACCUMULATE and view in reads and len(others) == 1:
    return _ACCUMULATE[e.primitive], [e], others[0], None
  if e.primitive is not P.add_p or view in e.invars:
    return None
  # a · view + g
  for scaled, g in (e.invars, e.invars[::-1]):
    m = producers.get(scaled)
    if m is None or m.primitive is not P.mul_p or view not in m.invars:
      continue
    if uses.get(scaled) != [e] or uses.get(view) != [m]:
      continue
    scale = [v for v in m.invars if v is not view]
    if len(scale) == 1:
      return "rescaled", [m, e], g, scale[0]
  return None


def _depends(body, roots, cut=()):
  """The variables computed from ``roots``, not through equations in
  ``cut``."""
  seen = set(roots)
  cut = {id(e) for e in cut}
  for e in body.eqns:
    if id(e) in cut:
      continue
    if any(isinstance(v, jex_core.Var) and v in seen for v in e.invars):
      seen.update(e.outvars)
  return seen


def _reads_allowed(body, carries, forms) -> bool:
  """What an iteration adds reads no carry; a rescaled sum's ``a`` may read
  the running maxima before and after the iteration, its ``g`` the maxima
  after it; the outputs read no carry."""
  maxima = [f for f in forms if f.op == "max"]
  if any(f.op == "rescaled" for f in forms) and not maxima:
    return False
  for f, c in zip(forms, carries):   # a carry other than a maximum is read
    if f.op != "max" and _view_reads(body, f, c):   # by its update only
      return False
  tainted = _depends(body, [c for f, c in zip(forms, carries)
                            if f.op != "max"])
  cores = [e for f in maxima for e in f.core]
  before = _depends(body, [f.view for f in maxima], cut=cores)
  after = _depends(body, [f.result for f in maxima])
  for f in forms:
    if _in(f.given, tainted) or _in(f.given, before):
      return False
    if f.op != "rescaled" and _in(f.given, after):
      return False
    if f.scale is not None and _in(f.scale, tainted):
      return False
  return not any(_in(y, tainted) or _in(y, before) or _in(y, after)
                 for y in body.outvars[len(carries):])


def _view_reads(body, form, carry):
  """Whether the carry is read anywhere but its layout chain and core."""
  own = {id(e) for e in form.into + form.core}
  for e in body.eqns:
    if id(e) in own:
      continue
    if carry in e.invars or form.view in e.invars:
      return True
  return False


def _in(v, seen):
  return isinstance(v, jex_core.Var) and v in seen


# -- the identities of a rescaled sum, on random values ------------------------
def check_rescaled(closed_body, forms, n_consts, n_carry, in_avals,
                   seed=0, rtol=1e-4) -> Optional[str]:
  """None when every rescaled sum's ``a`` and ``g`` meet the identities of
  the module docstring on random values of one iteration; else why not."""
  body = closed_body.jaxpr
  maxima = [f for f in forms if f.op == "max"]
  rescaled = [f for f in forms if f.op == "rescaled"]
  if not rescaled:
    return None
  rng = np.random.default_rng(seed)
  consts = [_random(rng, a.shape, a.dtype) for a in in_avals[:n_consts]]
  xs = [_random(rng, a.shape[1:], a.dtype)
        for a in in_avals[n_consts + n_carry:]]
  avals = [f.result.aval for f in maxima]
  m1 = [(rng.normal(size=a.shape) * 2).astype(a.dtype) for a in avals]
  m2 = [(m + np.abs(rng.normal(size=m.shape)) * 2).astype(m.dtype)
        for m in m1]
  m3 = [(m + np.abs(rng.normal(size=m.shape)) * 2).astype(m.dtype)
        for m in m2]
  skip = [e for f in forms for e in f.core]

  def run(before, after):
    """(a, g) of each rescaled sum, the maxima given."""
    seeds = dict(zip(body.constvars, closed_body.consts))
    seeds.update(zip(body.invars[:n_consts], consts))
    seeds.update(zip(body.invars[n_consts + n_carry:], xs))
    for f, b, a in zip(maxima, before, after):
      seeds[f.view] = b
      seeds[f.result] = a
    env = evaluate(body, seeds, skip)
    return ({id(f): np.asarray(env[f.scale]) for f in rescaled},
            {id(f): np.asarray(env[f.given]) for f in rescaled})
  with jax.ensure_compile_time_eval():
    a11, g1 = run(m1, m1)
    a12, g2 = run(m1, m2)
    a23, _ = run(m2, m3)
    a13, _ = run(m1, m3)
  for f in rescaled:
    k = id(f)
    checks = [("a(m, m) = 1", a11[k], np.ones_like(a11[k])),
              ("a(m1, m2) a(m2, m3) = a(m1, m3)", a12[k] * a23[k], a13[k]),
              ("a(m1, m2) g(m1) = g(m2)", a12[k] * g1[k], g2[k])]
    for what, got, want in checks:
      scale = max(float(np.nanmax(np.abs(want), initial=0)), 1e-30)
      if not np.allclose(got, want, rtol=rtol, atol=rtol * scale,
                         equal_nan=True):
        return ("its running sum is not rescaled by its running maximum "
                f"({what} fails on random values)")
  return None


def _random(rng, shape, dtype):
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if np.issubdtype(dtype, np.integer):
    return rng.integers(0, 64, size=shape).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


def evaluate(body, seeds, skip=()):
  """The values of ``body``'s variables from ``seeds`` (variable ->
  value): each equation whose operands are known runs, but those in
  ``skip`` and those whose outputs are seeded."""
  env = dict(seeds)
  skip = {id(e) for e in skip}

  def known(v):
    return isinstance(v, jex_core.Literal) or v in env

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]
  for e in body.eqns:
    if id(e) in skip or not all(known(v) for v in e.invars) or any(
        v in env for v in e.outvars):
      continue
    outs = e.primitive.bind(*[read(v) for v in e.invars], **e.params)
    outs = outs if e.primitive.multiple_results else [outs]
    env.update(zip(e.outvars, outs))
  return env
