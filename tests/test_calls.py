"""Call-like primitives: jit, closed_call, custom_jvp/vjp, remat."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as P

import scanagram
from conftest import check_refused, check_scan, random_like

L = 6
X = random_like(jnp.zeros((L, 3)))
W = random_like(jnp.zeros((3, 3)), 1)


def primitives_of(fun, *args):
  return {e.primitive for e in jax.make_jaxpr(fun)(*args).jaxpr.eqns}


def test_jit_inner_function():
  @jax.jit
  def inner(x):
    return jnp.tanh(x @ W)
  assert P.jit_p in primitives_of(lambda x: inner(x) * 2, X)
  check_scan(lambda x: inner(x) * 2 + inner(x + 1), X)


def test_jit_with_static_args_and_nested_jit():
  @functools.partial(jax.jit, static_argnums=1)
  def scale(x, k):
    return x * k

  @jax.jit
  def outer(x):
    return scale(jnp.cumsum(x, 0), 3) + jax.jit(jnp.sin)(x)
  check_scan(outer, X)


def test_stateful_ops_inside_jit():
  @jax.jit
  def inner(x):
    y = jnp.cumsum(x, 0)
    return jnp.concatenate([jnp.zeros((1, 3)), y[:-1]])  # shifted
  check_scan(lambda x: inner(x) + inner(2 * x), X,
             prefill_lengths=range(L + 1))
  _, init = scanagram.as_scan(lambda x: inner(x), X)
  assert init["position"].shape == ()


def test_closed_call():
  closed = jax.make_jaxpr(lambda x: jnp.cumsum(jnp.sin(x), 0))(X)

  def f(x):
    params = P.closed_call_p.get_bind_params({"call_jaxpr": closed})
    return P.closed_call_p.bind(x, **params)[0] * 2
  assert P.closed_call_p in primitives_of(f, X)
  check_scan(f, X)


def test_builtin_custom_jvp_functions():
  for act in (jax.nn.relu, jax.nn.gelu, jax.nn.silu, jax.nn.softplus,
              functools.partial(jax.nn.gelu, approximate=False)):
    check_scan(lambda x, act=act: act(x @ W), X)
  assert P.custom_jvp_call_p in primitives_of(jax.nn.relu, X)


@jax.custom_jvp
def clipped_log(x):
  return jnp.log1p(jnp.abs(x))


@clipped_log.defjvp
def _clipped_log_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return clipped_log(x), jnp.clip(t * jnp.sign(x) / (1 + jnp.abs(x)), -1, 1)


def test_user_custom_jvp():
  check_scan(lambda x: jnp.cumsum(clipped_log(x), 0), X)
  # the derived step is differentiable (through the body's primal ops)
  step, init = scanagram.as_scan(lambda x: clipped_log(x), X)
  grad = jax.grad(lambda x: lax.scan(step, init, x)[1].sum())(X)
  np.testing.assert_allclose(grad, jnp.sign(X) / (1 + jnp.abs(X)), rtol=1e-5)


@jax.custom_vjp
def scaled_grad(x):
  return jnp.sin(x)


def _scaled_fwd(x):
  return jnp.sin(x), x


def _scaled_bwd(x, g):
  return (g * jnp.cos(x) * 0.5,)


scaled_grad.defvjp(_scaled_fwd, _scaled_bwd)


def test_custom_vjp():
  assert P.custom_vjp_call_p in primitives_of(scaled_grad, X)
  check_scan(lambda x: jnp.cumsum(scaled_grad(x), 0) + scaled_grad(x @ W), X)


def test_custom_vjp_with_a_causal_body_and_an_unscanned_argument():
  @jax.custom_vjp
  def mix(w, x):
    return jnp.cumsum(x @ w, 0)
  mix.defvjp(lambda w, x: (mix(w, x), (w, x)),
             lambda res, g: (jnp.zeros_like(res[0]), g))
  check_scan(lambda x: mix(W, x), X)


def test_checkpoint():
  @jax.checkpoint
  def block(x):
    return jnp.tanh(jnp.cumsum(x, 0) @ W)
  assert primitives_of(block, X) & {P.remat_p}
  check_scan(lambda x: block(block(x)), X)

  policy = jax.checkpoint_policies.nothing_saveable
  check_scan(jax.checkpoint(lambda x: jnp.sin(x) @ W, policy=policy), X)
  # the step differentiates through remat
  fun = lambda x: block(x)
  step, init = scanagram.as_scan(fun, X)
  got = jax.grad(lambda x: lax.scan(step, init, x)[1].sum())(X)
  want = jax.grad(lambda x: fun(x).sum())(X)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_checkpoint_name():
  from jax.ad_checkpoint import checkpoint_name

  def f(x):
    h = checkpoint_name(jnp.cumsum(x, 0), "h")
    return jnp.sin(h) @ W
  check_scan(f, X)
  policy = jax.checkpoint_policies.save_only_these_names("h")
  check_scan(jax.checkpoint(f, policy=policy), X)


def test_calls_under_prefill():
  @jax.jit
  def inner(x):
    return jax.checkpoint(lambda y: jnp.cumsum(y, 0))(jax.nn.relu(x))
  fun = lambda x: inner(x) @ W
  want = fun(X)
  for p in range(L + 1):
    step, carry, out = scanagram.as_scan_with_prefill(fun, X, X[:p])
    np.testing.assert_allclose(out, want[:p], rtol=2e-5, atol=2e-5)
    if p < L:
      np.testing.assert_allclose(lax.scan(step, carry, X[p:])[1], want[p:],
                                 rtol=2e-5, atol=2e-5)


def test_non_causal_inside_a_call_refused():
  @jax.jit
  def inner(x):
    return x - x.mean(0)
  check_refused(lambda x: inner(x), X, "reduce_sum")

  @jax.checkpoint
  def rev(x):
    return jnp.flip(x, 0)
  check_refused(lambda x: rev(x), X, "rev")
