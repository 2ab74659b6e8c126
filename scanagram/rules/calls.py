"""Call-like primitives: ``jit``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call`` and ``remat`` (checkpoint).

Causal when their body is: the body is converted with the same kinds and
runs inline in every block (its state nests under the equation's name).
Custom derivative rules do not survive the conversion: the step
differentiates the body's primal operations.
"""
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram.interpreter import Converted, register


def _body(e):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in e.params:
      body = e.params[key]
      if isinstance(body, jex_core.Jaxpr):  # remat keeps an open jaxpr
        body = jex_core.ClosedJaxpr(body, ())
      return body
  raise e.refuse("cannot find the body of this call")


def convert_call(e, body, picked=None) -> Converted:
  """Converts a call to ``body`` (a ClosedJaxpr) made by equation ``e``: the
  body takes the equation's inputs ``picked`` (default: all), in order.
  Inputs map 1:1, so the body learns which are data, and the equation reads
  in blocks on a state (and by block) only what the body does."""
  n = len(e.in_kinds)
  picked = list(range(n)) if picked is None else list(picked)
  known = e.known_thunks()
  sub = e.convert(body, [e.in_kinds[i] for i in picked],
                  [known[i] for i in picked], [e.data(i) for i in picked])
  step_reads, by_block = [False] * n, {}
  for j, i in enumerate(picked):
    step_reads[i] = step_reads[i] or sub.step_reads[j]
    by_block[i] = by_block.get(i, True) and sub.lazy_invars[j]
  for i, lazy in by_block.items():
    if lazy:
      e.reads_by_block(i)

  def advance(ctx, state, ins):
    return sub.advance(ctx, state, [ins[i] for i in picked])
  return Converted(sub.out_kinds, advance, sub.stateful, sub.blocks,
                   step_reads=tuple(step_reads))


@register(P.jit_p, P.closed_call_p, P.custom_jvp_call_p, P.custom_vjp_call_p,
          P.remat_p, P.call_p)
def call_rule(e):
  """Causal when the called function is."""
  return convert_call(e, _body(e))


@register(P.linear_solve_p)
def linear_solve_rule(e):
  """``custom_linear_solve`` (``jnp.linalg.solve``): runs its ``solve``
  jaxpr on the solve consts and the right-hand side; causal when that is."""
  lengths = e.params["const_lengths"]
  start = lengths.matvec + lengths.vecmat
  picked = list(range(start, start + lengths.solve)) + list(
      range(sum(lengths), len(e.in_kinds)))
  return convert_call(e, e.params["jaxprs"].solve, picked)
