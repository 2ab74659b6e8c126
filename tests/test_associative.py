"""scanagram.associative_scan: lax.associative_scan that converts to a step."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import assert_trees_close, check_refused, check_scan, random_like

L, B, N = 7, 2, 3


def linear_step(left, right):
  """(a, b) pairs: h = a h_prev + b composed, the linear recurrence's op."""
  return left[0] * right[0], right[0] * left[1] + right[1]


def linear_rnn(xs, decay=0.9, scan=scanagram.associative_scan):
  """h_t = decay * h_{t-1} + x_t; xs: [L, N], the decay a full-length leaf."""
  return scan(linear_step, (jnp.full_like(xs, decay), xs))[1]


X = random_like(jnp.zeros((L, N)))


def test_same_values_gradients_and_batching_as_lax():
  want = linear_rnn(X, scan=lax.associative_scan)
  assert_trees_close(linear_rnn(X), want)
  assert_trees_close(jax.jit(linear_rnn)(X), want)
  assert_trees_close(jax.vmap(linear_rnn)(jnp.stack([X, 2 * X])),
                     jnp.stack([want, 2 * want]))
  grad = jax.grad(lambda x: (linear_rnn(x) ** 2).sum())
  grad_lax = jax.grad(
      lambda x: (linear_rnn(x, scan=lax.associative_scan) ** 2).sum())
  assert_trees_close(grad(X), grad_lax(X))
  for reverse, axis in [(True, 0), (False, 1), (False, -1)]:
    assert_trees_close(
        scanagram.associative_scan(jnp.maximum, X, reverse, axis),
        lax.associative_scan(jnp.maximum, X, reverse, axis))


def test_linear_recurrence_converts_with_every_prefill():
  step, _ = check_scan(linear_rnn, X, prefill_lengths=range(L + 1))


def test_lax_associative_scan_is_refused_pointing_here():
  check_refused(lambda xs: linear_rnn(xs, scan=lax.associative_scan), X,
                "scanagram.associative_scan")


def test_without_identity_and_along_a_batched_time_axis():
  # max has no identity among finite floats: the step must not invent one
  xs = random_like(jnp.zeros((B, L, N)), 1) - 10.0

  def running_max(xs):
    return scanagram.associative_scan(jnp.maximum, xs, axis=1)

  want = running_max(xs)
  fns = scanagram.to_step(running_max, xs, in_axes=1, out_axes=1)
  for p in (0, 1, L):
    carry, out = fns.prefill(xs[:, :p])
    assert_trees_close(out, want[:, :p])
    for t in range(p, L):
      carry, y = fns.step(carry, xs[:, t])
      assert_trees_close(y, want[:, t])


def test_along_another_axis_each_position_runs_alone():
  def over_features(xs):                   # xs: [L, N]: cumulative over N
    return scanagram.associative_scan(lax.add, xs, axis=1) * xs

  check_scan(over_features, X)
  check_scan(lambda xs: scanagram.associative_scan(
      lax.add, xs, reverse=True, axis=1), X)


def test_reverse_along_time_is_refused():
  check_refused(lambda xs: scanagram.associative_scan(lax.add, xs,
                                                      reverse=True),
                X, "associative_scan", "reverse=True", "future")


def test_elements_running_ahead_are_delayed():
  def with_previous(xs):                   # b_t = x_t + x_{t-1}
    previous = jnp.concatenate([jnp.zeros_like(xs[:1]), xs[:-1]])
    return scanagram.associative_scan(linear_step,
                                      (jnp.tanh(previous), xs + previous))

  check_scan(with_previous, X, prefill_lengths=range(L + 1))

  def all_ahead(xs):                       # every element runs 2 ahead
    earlier = jnp.concatenate([jnp.zeros_like(xs[:2]), xs[:-2]])
    return jnp.tanh(scanagram.associative_scan(lax.max, earlier)) * xs

  check_scan(all_ahead, X, prefill_lengths=range(L + 1))


def test_complex_diagonal_recurrence():
  # an LRU-like layer: complex diagonal state, real projections out
  lam = jnp.exp(-0.1 + 0.5j) * jnp.ones(N)

  def lru(xs):
    a = jnp.broadcast_to(lam, xs.shape)
    h = scanagram.associative_scan(linear_step, (a, xs.astype(jnp.complex64)))
    return h[1].real

  check_scan(lru, X, prefill_lengths=[0, 3, L])


def test_closing_over_the_sequence_is_refused():
  square = random_like(jnp.zeros((L, L)))

  def leaky(xs):                           # xs: [L, L]
    totals = xs.sum(1)                     # [L], scanned along time
    return scanagram.associative_scan(lambda a, b: a + b * totals, xs)

  check_refused(leaky, square, "associative_scan", "closes over a value "
                "that depends on the scanned input")


def test_bad_arguments_raise_like_lax():
  with pytest.raises(ValueError, match="different lengths"):
    scanagram.associative_scan(linear_step, (jnp.ones(3), jnp.ones(4)))
  with pytest.raises(ValueError, match="shaped like its arguments"):
    scanagram.associative_scan(lambda a, b: (a + b).sum(), jnp.ones((3, 2)))
  with pytest.raises(ValueError, match="out of range"):
    scanagram.associative_scan(lax.add, jnp.ones(3), axis=1)


class LinearRecurrentUnit(hk.Module):
  """A diagonal linear RNN trained with a parallel scan: ids [B, L] ->
  logits [B, L, V]; the decay is a parameter fn closes over."""

  def __call__(self, ids):
    x = hk.Embed(11, 8)(ids)
    log_decay = hk.get_parameter("log_decay", [8], init=jnp.zeros)
    decay = jax.nn.sigmoid(log_decay + 2.0)

    def combine(left, right):     # fn closes over a parameter: elements
      steps_l, h_l = left          # (n, h) compose as h -> decay**n h + b
      steps_r, h_r = right
      return steps_l + steps_r, decay ** steps_r * h_l + h_r
    inputs = jax.nn.sigmoid(hk.Linear(8)(x)) * x
    h = scanagram.associative_scan(combine, (jnp.ones_like(x), inputs),
                                   axis=1)[1]
    return hk.Linear(11)(jax.nn.gelu(h) + x)


def test_haiku_model_with_a_parameter_in_fn_through_to_step():
  from adapters.haiku import to_step
  model = hk.without_apply_rng(hk.transform(
      lambda ids: LinearRecurrentUnit()(ids)))
  ids = jax.random.randint(jax.random.key(3), (B, L), 0, 11)
  params = model.init(jax.random.key(4), ids)
  params = jax.tree.map(lambda p: p + 0.1, params)
  want = model.apply(params, ids)
  pair = to_step(model, ids, axis=1)
  for p in (0, 3, L):
    carry, out = pair.prefill(params, ids[:, :p])
    assert_trees_close(out, want[:, :p], 1e-4)
    for t in range(p, L):
      carry, y = pair.step(params, carry, ids[:, t])
      assert_trees_close(y, want[:, t], 1e-4)


def selective_ssm_block(x, d=8, n=4):
  """A Mamba-style block: causal depthwise conv, then a selective scan whose
  decay depends on the input (both elems scanned)."""
  u, gate = jnp.split(hk.Linear(2 * d)(hk.RMSNorm(-1)(x)), 2, -1)
  u = jax.nn.silu(hk.Conv1D(d, 4, padding=hk.pad.causal,
                            feature_group_count=d)(u))
  dt = jax.nn.softplus(hk.Linear(d)(u))                      # [B, L, d]
  a = -jnp.exp(hk.get_parameter("a_log", [d, n],
                                init=hk.initializers.RandomNormal()))
  b, c = hk.Linear(n)(u), hk.Linear(n)(u)                    # [B, L, n]
  decay = jnp.exp(dt[..., None] * a)                         # [B, L, d, n]
  drive = dt[..., None] * b[:, :, None, :] * u[..., None]
  h = scanagram.associative_scan(linear_step, (decay, drive), axis=1)[1]
  y = jnp.einsum("bldn,bln->bld", h, c) + u
  return x + hk.Linear(d)(y * jax.nn.silu(gate))


def test_selective_state_space_model_through_to_step():
  from adapters.haiku import to_step

  def forward(ids):
    x = hk.Embed(11, 8)(ids)
    x = x + 0.5 * jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # token shift
    for _ in range(2):
      x = selective_ssm_block(x)
    return hk.Linear(11)(x)

  model = hk.without_apply_rng(hk.transform(forward))
  ids = jax.random.randint(jax.random.key(5), (B, 2 * L), 0, 11)
  params = model.init(jax.random.key(6), ids)
  want = model.apply(params, ids)
  pair = to_step(model, ids, axis=1)
  carry, out = pair.prefill(params, ids[:, :5])
  assert_trees_close(out, want[:, :5], 1e-4)
  for t in range(5, 2 * L):
    carry, y = pair.step(params, carry, ids[:, t])
    assert_trees_close(y, want[:, t], 1e-4)


def test_state_keeps_only_the_leaves_the_outputs_need():
  """A linear recurrence whose decay product is dropped keeps only h, as a
  hand-written step does; read outputs keep what they depend on."""
  def state_shapes(fun):
    fns = scanagram.to_step(fun, X)
    state, = [v for k, v in fns.carry_spec().items()
              if k.endswith("associative_scan")]
    return [leaf.shape for leaf in state]

  assert state_shapes(linear_rnn) == [(1, N)]

  def both(xs):
    decays, h = scanagram.associative_scan(
        linear_step, (jnp.full_like(xs, 0.9), xs))
    return decays + h

  def decays_only(xs):
    decays, _ = scanagram.associative_scan(
        linear_step, (jax.nn.sigmoid(xs), xs))
    return decays

  assert state_shapes(both) == [(1, N), (1, N)]
  assert state_shapes(decays_only) == [(1, N)]
  check_scan(both, X, prefill_lengths=[0, 3, L])
  check_scan(decays_only, X, prefill_lengths=[0, 3, L])


def test_converts_under_vmap_inside_the_model():
  """A per-example layer vmapped over the batch keeps the primitive, with
  fn's closed-over values batched or not."""
  xs = random_like(jnp.zeros((L, B, N)), 2)

  def per_example(x, scale):               # x: [L, N]
    return scanagram.associative_scan(
        lambda l, r: (l[0] * r[0], r[0] * l[1] * scale + r[1]),
        (jax.nn.sigmoid(x), x))[1]

  def lax_per_example(x):
    return lax.associative_scan(linear_step, (jax.nn.sigmoid(x), x))[1]

  want = jax.vmap(lax_per_example, in_axes=1, out_axes=1)(xs)
  shared = jax.vmap(per_example, in_axes=(1, None), out_axes=1)
  batched = jax.vmap(per_example, in_axes=(1, 0), out_axes=1)
  for f in (lambda x: shared(x, 1.0), lambda x: batched(x, jnp.ones(B))):
    assert_trees_close(f(xs), want)
    check_scan(f, xs, prefill_lengths=[0, 3, L])
  grad = jax.grad(lambda x: shared(x, 1.0).sum())(xs)
  assert_trees_close(grad, jax.grad(lambda x: jax.vmap(
      lax_per_example, in_axes=1, out_axes=1)(x).sum())(xs))
