"""A composite causal function: shifts, cumsum, scan, conv, matmul."""
import jax
import jax.numpy as jnp
from jax import lax

from conftest import check_refused, check_scan, random_like


def test_composite():
  def f(xs):
    y = jnp.sin(xs) * 2 + jnp.arange(7.)[:, None]
    y = jnp.cumsum(y, 0) + jnp.concatenate([jnp.zeros((1, 3)), xs[:-1]], 0)
    y = jnp.pad(y, ((2, 0), (0, 0)))[:7]
    y = lax.scan(lambda c, a: (c * 0.5 + a, c), jnp.zeros(3), y)[1]
    y = y[None, :, :] @ jnp.ones((3, 3, 4))
    y = lax.conv_general_dilated(y, jnp.ones((3, 4, 4)), (1,), [(4, 0)],
                                 rhs_dilation=(2,),
                                 dimension_numbers=("NWC", "WIO", "NWC"))
    return y.sum(-1).T
  check_scan(f, random_like(jnp.zeros((7, 3))),
             prefill_lengths=range(8))


def test_reduce_over_time_refused():
  check_refused(lambda xs: xs.sum(0), jnp.zeros((5, 2)), "reduce_sum",
                "sums over the scanned axis 0")


def test_device_put_keeps_kinds():
  check_scan(lambda xs: jax.device_put(jnp.cumsum(xs, 0)) * 2,
             random_like(jnp.zeros((5, 2))))
