"""``scan``, ``while`` and ``cond``.

* ``scan`` along the scanned axis (its xs scanned along their leading axis):
  an RNN. Causal in the forward direction; its carry becomes the step's
  state, its final carry is known only at the end of the sequence.
* ``scan`` along another axis with the sequence in its carry, consts or xs
  (a scan over layers, ``hk.layer_stack``): causal when the body is; each
  iteration keeps its own state, stacked along a leading axis.
* ``while`` whose loop condition does not depend on the sequence, with a
  stateless body; ``cond`` whose branch index does not depend on it.
"""
import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core
from jax.extend.core import primitives as P

from scanagram.interpreter import (Converted, bind, register, stateless,
                                   time_block)
from scanagram.kinds import UNSCANNED, Scanned, WHOLE_SEQUENCE, is_scanned


@register(P.scan_p)
def scan_rule(e):
  """Dispatches on whether the scan runs along the scanned axis."""
  n_consts, n_carry = e.params["num_consts"], e.params["num_carry"]
  xs_kinds = e.in_kinds[n_consts + n_carry:]
  if any(is_scanned(k) and k.axis == 0 for k in xs_kinds):
    return _scan_along_time(e)
  return _scan_over_other_axis(e)


def _scan_along_time(e):
  """Causal when not reversed, with consts and initial carry unscanned and
  every scanned xs scanned along the scan's axis 0."""
  n_consts, n_carry = e.params["num_consts"], e.params["num_carry"]
  kinds = e.in_kinds
  if e.params["reverse"]:
    raise e.refuse("scan runs in reverse along the scanned axis: element t "
                   "would need the elements after it")
  for i, k in enumerate(kinds[:n_consts + n_carry]):
    if k is not UNSCANNED:
      what = "a const" if i < n_consts else "its initial carry"
      raise e.refuse(f"scan iterates along the scanned axis but {what} "
                     "depends on the whole sequence")
  xs = range(n_consts + n_carry, len(kinds))
  for i in xs:
    if kinds[i] is not UNSCANNED and not (is_scanned(kinds[i]) and
                                          kinds[i].axis == 0):
      raise e.refuse("scan iterates along the scanned axis but one of its xs "
                     f"is scanned along its axis {kinds[i].axis}")
  ahead = next(kinds[i].ahead for i in xs if is_scanned(kinds[i]))
  body = e.params["jaxpr"]
  length = e.params["length"]
  out_kinds = ([WHOLE_SEQUENCE] * n_carry +
               [Scanned(0, ahead)] * (len(e.out_avals) - n_carry))
  run_body = jex_core.jaxpr_as_fun(body)

  def advance(ctx, carry, ins):
    ins = list(ins)
    for i in xs:
      if kinds[i] is UNSCANNED:
        ins[i] = time_block(ctx, ins[i], 0, ahead)
    consts = ins[:n_consts]
    if carry is None:   # the state: the scan's carry
      carry = ins[n_consts:n_consts + n_carry]
    n = ctx.span(length, ahead)[1]
    if ctx.is_step:
      outs = run_body(*consts, *carry, *[a[0] for a in ins[n_consts +
                                                           n_carry:]])
      new, ys = outs[:n_carry], [y[None] for y in outs[n_carry:]]
      if ctx.count is not None:
        new = [jnp.where(ctx.count > 0, c, old) for c, old in zip(new, carry)]
      return list(new), list(new) + ys
    if ctx.count is None:
      outs = bind(e.eqn, [*consts, *carry, *ins[n_consts + n_carry:]],
                  dict(e.params, length=n))
      return outs[:n_carry], outs
    real = ctx.real(length, ahead)

    def masked(c, i_x):   # past the row's real elements the carry holds
      i, x = i_x
      outs = run_body(*consts, *c, *x)
      keep = i < real
      return ([jnp.where(keep, new, old) for new, old in
               zip(outs[:n_carry], c)], outs[n_carry:])
    carry, ys = lax.scan(masked, list(carry),
                         (jnp.arange(n), ins[n_consts + n_carry:]), length=n)
    return list(carry), list(carry) + list(ys)
  return Converted(out_kinds, advance, True)


def _body_fixed_point(e, in_kinds, carry_slice, convert_body):
  """Converts a loop body, widening the carry's kinds until the kinds it
  returns are the kinds it takes (a carry that starts unscanned may become
  scanned after one iteration)."""
  kinds = list(in_kinds)
  for _ in range(len(kinds) + 1):
    sub = convert_body(kinds)
    carry_out = sub.out_kinds[:carry_slice.stop - carry_slice.start]
    carry_in = kinds[carry_slice]
    if list(carry_out) == list(carry_in):
      return sub, kinds
    for j, (k_in, k_out) in enumerate(zip(carry_in, carry_out)):
      if k_in is UNSCANNED and k_out is not UNSCANNED:
        kinds[carry_slice.start + j] = k_out
      elif k_in != k_out:
        raise e.refuse(
            f"{e.primitive.name}'s carry {j} is {k_in} on entry and {k_out} "
            "after one iteration (it shifts or moves the sequence each time)")
  raise e.refuse("the kinds of its carry do not settle")


def _widened_carry(e, kinds, first):
  """``align(ctx, ins)``: the initial carries that are unscanned but become
  scanned after one iteration (``jnp.zeros((L, D))`` to which the sequence
  is added) hold all L elements; they are cut to the block the mode
  computes. ``kinds``: the settled kinds of the operands from ``first`` on."""
  widened = {}
  for j, k in enumerate(kinds):
    if e.in_kinds[first + j] is UNSCANNED and k is not UNSCANNED:
      if not is_scanned(k):
        raise e.refuse(f"{e.primitive.name}'s carry {j} starts unscanned and "
                       f"becomes {k}")
      widened[first + j] = k

  def align(ctx, ins):
    ins = list(ins)
    for i, k in widened.items():
      ins[i] = time_block(ctx, ins[i], k.axis, k.ahead)
    return ins
  return align


def _scan_over_other_axis(e):
  """A scan whose iterations each see the whole sequence (a scan over
  layers): causal when its body is. Each iteration's state is stacked."""
  n_consts, n_carry = e.params["num_consts"], e.params["num_carry"]
  body = e.params["jaxpr"]
  kinds = list(e.in_kinds)
  body_kinds = kinds[:n_consts + n_carry] + [
      k if k is UNSCANNED else Scanned(k.axis - 1, k.ahead)
      for k in kinds[n_consts + n_carry:]]
  known = e.known_thunks()
  body_known = known[:n_consts] + [lambda: None] * (len(kinds) - n_consts)
  # consts and xs map 1:1 to the body's inputs; the carry is data after an
  # iteration if anything is
  data = [e.data(i) for i in range(len(kinds))]
  data[n_consts:n_consts + n_carry] = [any(data)] * n_carry
  sub, body_kinds = _body_fixed_point(
      e, body_kinds, slice(n_consts, n_consts + n_carry),
      lambda ks: e.convert(body, ks, body_known, data))
  # each iteration carries its own values computed once (stacked with its
  # state); xs no block on a state reads are not sliced, and consts read
  # only by block may stay Deferred
  reads = list(sub.step_reads)
  reads[n_consts:n_consts + n_carry] = [True] * n_carry
  for i in range(n_consts):
    if sub.lazy_invars[i]:
      e.reads_by_block(i)
  kinds[n_consts:n_consts + n_carry] = body_kinds[n_consts:n_consts + n_carry]
  align = _widened_carry(e, kinds[n_consts:n_consts + n_carry], n_consts)
  out_kinds = list(sub.out_kinds[:n_carry]) + [
      k if k is UNSCANNED else Scanned(k.axis + 1, k.ahead)
      for k in sub.out_kinds[n_carry:]]
  reverse = e.params["reverse"]

  def split(ins):
    return (ins[:n_consts], ins[n_consts:n_consts + n_carry],
            ins[n_consts + n_carry:])

  def advance(ctx, states, ins):
    consts, carry, xs = split(align(ctx, ins))
    xs = [x if ctx.fresh or read else None
          for x, read in zip(xs, reads[n_consts + n_carry:])]

    def iteration(carry, x_state):
      x, state = x_state
      state, outs = sub.advance(ctx, state, list(consts) + list(carry) +
                                list(x))
      return outs[:n_carry], (outs[n_carry:], state)
    carry, (ys, states) = lax.scan(iteration, list(carry), (list(xs), states),
                                   length=e.params["length"], reverse=reverse)
    return states, list(carry) + list(ys)
  return Converted(out_kinds, advance, sub.stateful, sub.blocks,
                   step_reads=tuple(reads))


@register(P.while_p)
def while_rule(e):
  """Causal when the loop condition does not depend on the sequence (every
  position runs the same iterations) and the body keeps no state."""
  cond, body = e.params["cond_jaxpr"], e.params["body_jaxpr"]
  nc, nb = e.params["cond_nconsts"], e.params["body_nconsts"]
  kinds = list(e.in_kinds)
  n_carry = len(kinds) - nc - nb
  known = e.known_thunks()
  body_kinds = kinds[nc:]
  # the body runs many times per block with no state of its own: nothing
  # in it is computed once
  sub, body_kinds = _body_fixed_point(
      e, body_kinds, slice(nb, nb + n_carry),
      lambda ks: e.convert(body, ks, known[nc:nc + nb] +
                           [lambda: None] * n_carry, once=False))
  carry_kinds = body_kinds[nb:]
  align = _widened_carry(e, carry_kinds, nc + nb)
  cond_sub = e.convert(cond, kinds[:nc] + carry_kinds, once=False)
  if cond_sub.out_kinds[0] is not UNSCANNED:
    raise e.refuse("the while loop's condition depends on the scanned input, "
                   "so positions would run different numbers of iterations")
  if sub.stateful or cond_sub.stateful:
    raise e.refuse("the while loop's body keeps state along the sequence "
                   "(use lax.scan or fori_loop with static bounds)")

  def apply(ctx, ins):
    ins = align(ctx, ins)
    cconsts, bconsts, carry = ins[:nc], ins[nc:nc + nb], ins[nc + nb:]
    return list(lax.while_loop(
        lambda c: cond_sub.advance(ctx, None, list(cconsts) + list(c))[1][0],
        lambda c: sub.advance(ctx, None, list(bconsts) + list(c))[1],
        list(carry)))
  return stateless(carry_kinds, apply)


@register(P.cond_p)
def cond_rule(e):
  """Causal when the branch index does not depend on the sequence and every
  branch is causal with the same output kinds."""
  if e.in_kinds[0] is not UNSCANNED:
    raise e.refuse("the branch taken depends on the scanned input")
  known = e.known_thunks()[1:]
  data = [e.data(i) for i in range(1, len(e.in_kinds))]
  subs = [e.convert(b, e.in_kinds[1:], known, data)
          for b in e.params["branches"]]
  # a branch's values computed once live in its state (the same branch is
  # taken in every block: its index does not depend on the sequence)
  reads = [True] + [any(s.step_reads[i] for s in subs)
                    for i in range(len(e.in_kinds) - 1)]
  out_kinds = subs[0].out_kinds
  if any(s.out_kinds != out_kinds for s in subs):
    raise e.refuse("its branches give outputs of different kinds "
                   f"{[s.out_kinds for s in subs]}")
  stateful = any(s.stateful for s in subs)

  def advance(ctx, states, ins):
    index, ops = ins[0], ins[1:]
    if states is None:   # the initial state of every branch, then this one's
      shapes = [jax.eval_shape(lambda o, s=s: s.advance(ctx, None, o)[0], ops)
                for s in subs]
      states = [jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), sh)
                for sh in shapes]
      fresh = True
    else:
      fresh = False

    def branch(i):
      def run(states, ops):
        state, outs = subs[i].advance(ctx, None if fresh else states[i], ops)
        states = list(states)
        states[i] = state
        return states, outs
      return run
    states, outs = lax.switch(index, [branch(i) for i in range(len(subs))],
                              states, ops)
    return (states if stateful else None), outs
  return Converted(out_kinds, advance, stateful,
                   all(s.blocks for s in subs), step_reads=tuple(reads))
