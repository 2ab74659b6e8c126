"""FFT, batched linear algebra and pooling: the scanned axis as a batch
axis; pooling along time with causal padding."""
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import scanagram
from conftest import check_refused, check_scan, random_like

L = 5
X = random_like(jnp.zeros((L, 3, 3)))


def spd(x):
  return x @ jnp.swapaxes(x, -1, -2) + 3 * jnp.eye(3)


def test_linear_algebra_per_position():
  check_scan(lambda x: jnp.linalg.cholesky(spd(x)), X)
  check_scan(lambda x: jnp.linalg.qr(spd(x))[0], X, tol=1e-4)
  check_scan(lambda x: jnp.linalg.eigh(spd(x))[0], X, tol=1e-4)
  check_scan(lambda x: jnp.linalg.solve(spd(x), x), X, tol=1e-4)
  check_scan(lambda x: lax.linalg.triangular_solve(
      jnp.linalg.cholesky(spd(x)), x, left_side=True, lower=True), X,
      tol=1e-4)


def test_fft_over_other_axes():
  check_scan(lambda x: jnp.abs(jnp.fft.fft(x, axis=-1)), X, tol=1e-4)
  check_scan(lambda x: jnp.fft.irfft(jnp.fft.rfft(x, axis=1), 3, axis=1), X,
             tol=1e-4)


def test_pooling_and_approx_top_k_over_other_axes():
  check_scan(lambda x: lax.reduce_window(x, 0., lax.add, (1, 1, 2),
                                         (1, 1, 1), "VALID"), X)
  check_scan(lambda x: lax.approx_max_k(x, 1)[0], X)
  check_scan(lambda x: lax.reduce_window(x, 1., lax.mul, (1, 2, 1),
                                         (1, 1, 1), "SAME"), X)


def test_along_the_scanned_axis_refused():
  check_refused(lambda x: jnp.fft.fft(x, axis=0), X, "fft mixes the scanned axis")
  check_refused(lambda x: jnp.linalg.cholesky(spd(jnp.swapaxes(x, 0, 2)
                                                  [:3, :3])), X)
  check_refused(lambda x: lax.reduce_window(x, 0., lax.add, (2, 1, 1),
                                            (1, 1, 1), "VALID"), X,
                "reduce_window_sum", "element t + 1")


def _causal_pool(init, op, size, dilation=1, extra=0, stride=1, x_axis=0):
  reach = (size - 1) * dilation
  window, strides, dilations = [1, 1, 1], [1, 1, 1], [1, 1, 1]
  window[x_axis], strides[x_axis], dilations[x_axis] = size, stride, dilation
  padding = [(0, 0)] * 3
  padding[x_axis] = (reach + extra, -extra)

  def f(x):
    return lax.reduce_window(x, init, op, tuple(window), tuple(strides),
                             padding, window_dilation=tuple(dilations))
  return f


@pytest.mark.parametrize("init,op", [(0., lax.add), (-jnp.inf, lax.max),
                                     (jnp.inf, lax.min), (1., lax.mul)])
@pytest.mark.parametrize("size,dilation", [(2, 1), (3, 1), (2, 3), (L, 1)])
def test_causal_pooling_along_time(init, op, size, dilation):
  """Moving sums, maxima, minima, products over the last K elements: the
  step keeps a ring of the last (K - 1) * dilation inputs."""
  f = _causal_pool(init, op, size, dilation)
  check_scan(lambda x: f(x) * 0.5 + x, X, prefill_lengths=range(L + 1),
             tol=1e-4)


def test_causal_pooling_of_shifted_and_integer_inputs():
  f = _causal_pool(0., lax.add, 3, extra=1)      # the window ends at t - 1
  check_scan(f, X, prefill_lengths=range(L + 1))
  ints = (X * 10).astype(jnp.int32)
  check_scan(_causal_pool(jnp.iinfo(jnp.int32).min, lax.max, 3), ints,
             prefill_lengths=[0, 2, L])
  # a moving max of a value that itself runs one element ahead
  check_scan(lambda x: _causal_pool(-jnp.inf, lax.max, 2, extra=-1)(
      jnp.pad(x, ((1, 0), (0, 0), (0, 0)))[:L]), X)


def test_causal_pooling_carry_is_a_ring_of_the_reach():
  fns = scanagram.to_step(_causal_pool(0., lax.add, 3, dilation=2), X)
  ring, = [s for s in jax.tree.leaves(fns.carry_spec()) if s.ndim]
  assert ring.shape == (4,) + X.shape[1:]


def test_pooling_along_time_that_is_not_causal_refused():
  check_refused(_causal_pool(0., lax.add, 2, extra=-1), X,
                "reduce_window_sum", "element t + 1")
  check_refused(_causal_pool(0., lax.add, 2, stride=2), X,
                "reduce_window_sum", "strides")
