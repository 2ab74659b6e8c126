"""custom_scanagram: user-given steps for functions causal as a whole."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import assert_trees_close, check_refused, check_scan, random_like

L, D = 6, 3
X = random_like(jnp.zeros((L, D)))
WQ, WK, WV = (random_like(jnp.zeros((D, D)), s) for s in (1, 2, 3))


@scanagram.custom_scanagram
def linear_attention(xs):
  """Causal by its mask, but the conversion would see q @ k.T over all
  positions followed by a multiplication with a mask: xs [T, D]."""
  q, k, v = jax.nn.elu(xs @ WQ) + 1, jax.nn.elu(xs @ WK) + 1, xs @ WV
  mask = jnp.tril(jnp.ones((xs.shape[0], xs.shape[0])))
  scores = (q @ k.T) * mask
  return (scores @ v) / (scores.sum(1, keepdims=True))


@linear_attention.def_scanagram
def _linear_attention_rule(axis, xs_shapes):
  assert axis == 0 and xs_shapes.shape == (L, D)
  assert isinstance(xs_shapes, jax.ShapeDtypeStruct)

  def body(carry, x):  # x: [D]
    kv, ksum = carry
    q, k, v = jax.nn.elu(x @ WQ) + 1, jax.nn.elu(x @ WK) + 1, x @ WV
    kv, ksum = kv + jnp.outer(k, v), ksum + k
    return (kv, ksum), (q @ kv) / (q @ ksum)
  return 0, body, (jnp.zeros((D, D)), jnp.zeros(D))


def test_attention_like_function_converts():
  check_scan(linear_attention, X, prefill_lengths=range(L + 1), tol=1e-4)
  check_scan(lambda x: jnp.cumsum(linear_attention(jnp.sin(x)), 0) @ WQ, X,
             tol=1e-4)


def test_carry_is_the_rules_carry():
  _, init = scanagram.as_scan(linear_attention, X)
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(init))
  assert shapes == [(), (D,), (D, D)]


def test_behaves_as_its_body_under_jit_grad_vmap():
  body = linear_attention.__wrapped__
  assert_trees_close(linear_attention(X), body(X))
  assert_trees_close(jax.jit(linear_attention)(X), body(X))
  loss = lambda f: (lambda x: (f(x) ** 2).sum())
  assert_trees_close(jax.grad(loss(linear_attention))(X), jax.grad(loss(body))(X),
                     tol=1e-4)
  batch = random_like(jnp.zeros((2, L, D)), 7)
  assert_trees_close(jax.vmap(linear_attention)(batch), jax.vmap(body)(batch))
  assert_trees_close(jax.jit(jax.grad(loss(linear_attention)))(X),
                     jax.grad(loss(body))(X), tol=1e-4)
  _, jvp = jax.jvp(linear_attention, (X,), (jnp.ones_like(X),))
  assert_trees_close(jvp, jax.jvp(body, (X,), (jnp.ones_like(X),))[1],
                     tol=1e-4)
  jaxpr = jax.make_jaxpr(linear_attention)(X)
  assert [e.primitive.name for e in jaxpr.jaxpr.eqns] == ["custom_scanagram"]


def test_grad_through_the_converted_step():
  step, init = scanagram.as_scan(linear_attention, X)
  got = jax.grad(lambda x: lax.scan(step, init, x)[1].sum())(X)
  want = jax.grad(lambda x: linear_attention(x).sum())(X)
  assert_trees_close(got, want, tol=1e-4)


@scanagram.custom_scanagram
def running_max(xs):
  """Pytree in and out, time along axis 1: xs = {"a": [B, T], "b": [B, T]}."""
  both = xs["a"] + xs["b"]
  t = both.shape[1]
  mask = jnp.tril(jnp.ones((t, t), bool))
  full = jnp.where(mask[None], both[:, None, :], -jnp.inf).max(-1)
  return full, (both * 2,)


@running_max.def_scanagram_with_prefill
def _running_max_rule(axis, xs_shapes):
  assert axis == 1 and xs_shapes["a"].shape == (2, L)

  def init_fn(prefill):  # a whole prompt at once: [B, P]
    both = prefill["a"] + prefill["b"]
    run = lax.cummax(jnp.concatenate([jnp.full((2, 1), -jnp.inf), both], 1),
                     axis=1)
    return run[:, -1], (run[:, 1:], (both * 2,))

  def body(carry, x):  # x: {"a": [B], "b": [B]}
    both = x["a"] + x["b"]
    carry = jnp.maximum(carry, both)
    return carry, (carry, (both * 2,))
  return 1, init_fn, body


def test_with_prefill_pytrees_and_axis_1():
  xs = random_like({"a": jnp.zeros((2, L)), "b": jnp.zeros((2, L))}, 4)
  fns = scanagram.to_step(running_max, xs, in_axes=1, out_axes=1)
  want = running_max(xs)
  for p in (0, 1, 3, L):
    carry, out = fns.prefill(jax.tree.map(lambda x: x[:, :p], xs))
    assert_trees_close(out, jax.tree.map(lambda y: y[:, :p], want))
    for t in range(p, L):
      carry, y = fns.step(carry, jax.tree.map(lambda x: x[:, t], xs))
      assert_trees_close(y, jax.tree.map(lambda y: y[:, t], want))


def test_time_axis_moved_before_the_call():
  # fun's input is time-major; the custom function sees time along axis 1
  def fun(xs):  # xs: {"a": [T, B], "b": [T, B]}
    out, (twice,) = running_max(jax.tree.map(lambda x: x.T, xs))
    return out.T + twice.T
  check_scan(fun, random_like({"a": jnp.zeros((L, 2)),
                               "b": jnp.zeros((L, 2))}, 5),
             prefill_lengths=range(L + 1))


def test_shifted_input_runs_ahead():
  def fun(xs):
    shifted = jnp.concatenate([jnp.zeros((1, D)), xs[:-1]])
    return linear_attention(shifted + 1.)
  check_scan(fun, X, prefill_lengths=range(L + 1), tol=1e-4)


@scanagram.custom_scanagram
def weighted(xs):
  x, w = xs
  return jnp.cumsum(x * w, 0)


@weighted.def_scanagram
def _weighted_rule(axis, xs_shapes):
  def body(c, xw):
    c = c + xw[0] * xw[1]
    return c, c
  return axis, body, jnp.zeros(xs_shapes[0].shape[1:])


def test_unscanned_full_length_leaf_of_xs():
  table = random_like(jnp.zeros((L, D)), 6)
  check_scan(lambda x: weighted((x, table)), X)
  check_refused(lambda x: weighted((x, table[:1])), X, "custom_scanagram",
                "has no axis 0 of length")


def test_closing_over_the_sequence_refused():
  def fun(xs):
    @scanagram.custom_scanagram
    def f(ys):
      return ys + xs
    f.def_scanagram(lambda axis, shapes: (axis, lambda c, y: (c, y), 0.))
    return f(jnp.sin(xs))
  check_refused(fun, X, "custom_scanagram", "closes over a value")


def test_no_rule_refused():
  @scanagram.custom_scanagram
  def f(xs):
    return xs * 2
  assert_trees_close(f(X), X * 2)
  check_refused(lambda x: f(x), X, "custom_scanagram", "has no rule")


def test_body_closing_over_params_as_inputs():
  # the body closes over a traced parameter; the rule takes it through xs
  @scanagram.custom_scanagram
  def scaled_cumsum(xs):
    x, w = xs
    return jnp.cumsum(x, 0) * w

  @scaled_cumsum.def_scanagram
  def _(axis, xs_shapes):
    return axis, lambda c, xw: (c + xw[0], (c + xw[0]) * xw[1]), jnp.zeros(D)

  def model(w, xs):
    return scaled_cumsum((xs, jnp.broadcast_to(w, xs.shape)))
  fns = scanagram.to_step(model, jnp.ones(D), X, in_axes=(None, 0))
  w = jnp.arange(3.)
  want = model(w, X)
  carry = fns.init(w)
  for t in range(L):
    carry, y = fns.step(w, carry, X[t])
    assert_trees_close(y, want[t])


@pytest.mark.parametrize("p", [0, 2, L])
def test_as_scan_with_prefill(p):
  step, carry, out = scanagram.as_scan_with_prefill(linear_attention, X, X[:p])
  want = linear_attention(X)
  assert_trees_close(out, want[:p], tol=1e-4)
  if p < L:
    assert_trees_close(lax.scan(step, carry, X[p:])[1], want[p:], tol=1e-4)


@scanagram.custom_scanagram
def cumsum_transposed(xs):  # [T, D] -> [D, T]
  return jnp.cumsum(xs, 0).T


@cumsum_transposed.def_scanagram
def _cumsum_transposed_rule(axis, xs_shapes):
  assert axis == 0
  return 1, lambda c, x: (c + x, c + x), jnp.zeros(xs_shapes.shape[1:])


def test_output_axis_differs_from_input_axis_and_inside_jit():
  check_scan(lambda x: cumsum_transposed(x).T, X,
             prefill_lengths=range(L + 1))
  check_scan(jax.jit(lambda x: cumsum_transposed(jnp.cos(x)).T * 2), X)
  # vmap over a batch of carries of the converted step
  step, init = scanagram.as_scan(lambda x: cumsum_transposed(x).T, X)
  batch = random_like(jnp.zeros((2, L, D)), 11)
  inits = jax.tree.map(lambda a: jnp.stack([a, a]), init)
  got = jax.vmap(lambda c, xs: lax.scan(step, c, xs)[1])(inits, batch)
  assert_trees_close(got, jnp.cumsum(batch, 1))


def test_converts_when_vmapped_inside_the_model():
  """A per-example custom function vmapped over the batch keeps its rule:
  the rule sees one example, and its functions are vmapped."""
  batch = random_like(jnp.zeros((L, 2, D)), 12)              # [T, B, D]
  check_scan(jax.vmap(linear_attention, in_axes=1, out_axes=1), batch,
             prefill_lengths=[0, 3, L], tol=1e-4)
  check_scan(lambda x: jnp.transpose(
      jax.vmap(cumsum_transposed, in_axes=1)(x), (2, 0, 1)), batch)
  # a prefill rule, pytrees in and out, time along axis 2 once batched
  xs = random_like({"a": jnp.zeros((3, 2, L)), "b": jnp.zeros((3, 2, L))},
                   13)
  batched = jax.vmap(running_max)
  fns = scanagram.to_step(batched, xs, in_axes=2, out_axes=2)
  want = batched(xs)
  for p in (0, 3, L):
    carry, out = fns.prefill(jax.tree.map(lambda x: x[..., :p], xs))
    assert_trees_close(out, jax.tree.map(lambda y: y[..., :p], want))
    for t in range(p, L):
      carry, y = fns.step(carry, jax.tree.map(lambda x: x[..., t], xs))
      assert_trees_close(y, jax.tree.map(lambda y: y[..., t], want))


def test_vmapped_over_the_scanned_axis_refused():
  check_refused(jax.vmap(lambda row: cumsum_transposed(row[None])), X,
                "custom_scanagram", "vmap maps cumsum_transposed over the "
                "scanned axis")
