"""FFT and batched linear algebra with the scanned axis as a batch axis."""
import jax
import jax.numpy as jnp
from jax import lax

from conftest import check_refused, check_scan, random_like

X = random_like(jnp.zeros((5, 3, 3)))


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
                "reduce_window_sum", "pools along the scanned axis")
