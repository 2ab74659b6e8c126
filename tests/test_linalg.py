"""dot_general and conv_general_dilated along and beside the scanned axis."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import check_refused, check_scan, random_like

L = 6
X = random_like(jnp.zeros((L, 3)))
W = random_like(jnp.zeros((3, 4)), seed=1)


# -- dot_general --------------------------------------------------------------

def test_matmul_right():
  check_scan(lambda x: x @ W, X)


def test_matmul_left_transposed():
  # W.T @ x.T: the scanned axis is the rhs's free axis, output axis 1
  check_scan(lambda x: (W.T @ x.T).T, X)


def test_matmul_scanned_axis_moved_inside_fun():
  def f(x):
    y = jnp.einsum("dt,de->te", x.T, W)  # time comes back as axis 0
    z = jnp.einsum("ed,td->et", W.T, x)  # time is the output's axis 1
    return y + z.T
  check_scan(f, X)


def test_einsum_with_batch_dims_unscanned_batch():
  # batch dims beside time: [T, B, D] x [B, D, E] -> [T, B, E]
  xs = random_like(jnp.zeros((L, 2, 3)))
  w = random_like(jnp.zeros((2, 3, 4)), seed=2)
  check_scan(lambda x: jnp.einsum("tbd,bde->tbe", x, w), xs)
  check_scan(lambda x: jnp.einsum("bde,tbd->tbe", w, x), xs)


def test_scanned_axis_as_batch_dim_of_both_operands():
  xs = {"a": random_like(jnp.zeros((L, 2, 3))),
        "b": random_like(jnp.zeros((L, 3, 4)), seed=3)}
  check_scan(lambda x: jnp.einsum("tij,tjk->tik", x["a"], x["b"]), xs)
  # per-position inner product, and with time moved to the end
  check_scan(lambda x: jnp.einsum("tij,tij->ti", x["a"], x["a"]), xs)
  check_scan(lambda x: jnp.einsum("ijt,tjk->tik",
                                  jnp.moveaxis(x["a"], 0, 2), x["b"]), xs)


def test_unscanned_operand_with_full_length_batch_dim():
  # a per-position weight table [T, D, E], paired with time as a batch dim
  table = random_like(jnp.zeros((L, 3, 4)), seed=4)
  check_scan(lambda x: jnp.einsum("td,tde->te", x, table), X)
  check_scan(lambda x: jnp.einsum("tde,td->et", table, x).T, X)


def test_dot_general_integer_and_bfloat16():
  xi = random_like(jnp.zeros((L, 3), jnp.int32))
  wi = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
  check_scan(lambda x: x @ wi, xi)
  xb = random_like(jnp.zeros((L, 3), jnp.bfloat16))
  check_scan(lambda x: x @ W.astype(jnp.bfloat16), xb)


def test_dot_general_contracting_time_refused():
  check_refused(lambda x: x.T @ x[:, :1], X, "dot_general",
                "contracts over the scanned axis")
  check_refused(lambda x: jnp.ones((2, L)) @ x, X, "dot_general",
                "contracts over the scanned axis 0 of its rhs")


def test_outer_product_over_time_refused():
  check_refused(lambda x: x @ x.T, X, "dot_general")
  # q @ k.T with no mask, then a softmax: still not causal
  check_refused(lambda x: jax.nn.softmax((x @ W) @ (x @ W).T, -1) @ x, X)


# -- conv_general_dilated -----------------------------------------------------

def conv_nwc(x, w, padding, dilation=1, groups=1):
  """x: [N, T, C], w: [K, C // groups, O]."""
  return lax.conv_general_dilated(
      x, w, (1,), [padding], rhs_dilation=(dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


def conv_ncw(x, w, padding, dilation=1):
  """x: [N, C, T], w: [O, C, K]."""
  return lax.conv_general_dilated(
      x, w, (1,), [padding], rhs_dilation=(dilation,),
      dimension_numbers=("NCW", "OIW", "NCW"))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_causal_conv_nwc_time_major(size, dilation):
  # xs: [T, C]; inside fun: [1, T, C]
  w = random_like(jnp.zeros((size, 3, 2)), seed=size)
  reach = (size - 1) * dilation
  check_scan(lambda x: conv_nwc(x[None], w, (reach, 0), dilation)[0], X)


@pytest.mark.parametrize("size,dilation", [(2, 1), (3, 2), (4, 1)])
def test_causal_conv_ncw(size, dilation):
  w = random_like(jnp.zeros((2, 3, size)), seed=size)
  reach = (size - 1) * dilation
  # time is the spatial axis 2 inside fun, moved back to 0 at the end
  check_scan(lambda x: conv_ncw(x.T[None], w, (reach, 0), dilation)[0].T, X)


def test_causal_conv_batch_major():
  # xs: [B, T, C] scanned along axis 1; fun transposes to time-major
  xs = random_like(jnp.zeros((2, L, 3)))
  w = random_like(jnp.zeros((3, 3, 2)), seed=5)

  def batch_major(xb):  # [B, T, C] -> [B, T, O]
    return conv_nwc(xb, w, (4, 0), 2)

  def fun(x):  # [T, B, C]: time is axis 1 inside the conv
    return jnp.transpose(batch_major(jnp.transpose(x, (1, 0, 2))), (1, 0, 2))
  check_scan(fun, jnp.transpose(xs, (1, 0, 2)))

  fns = scanagram.to_step(batch_major, xs, in_axes=1, out_axes=1)
  want = batch_major(xs)
  carry, out = fns.prefill(xs[:, :2])
  np.testing.assert_allclose(out, want[:, :2], rtol=2e-5, atol=2e-5)
  for t in range(2, L):
    carry, y = fns.step(carry, xs[:, t])
    np.testing.assert_allclose(y, want[:, t], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dilation", [1, 2])
def test_depthwise_conv(dilation):
  w = random_like(jnp.zeros((3, 1, 3)), seed=6)  # groups = channels = 3
  check_scan(lambda x: conv_nwc(x[None], w, (2 * dilation, 0), dilation,
                                groups=3)[0], X)
  w2 = random_like(jnp.zeros((2, 1, 6)), seed=7)  # channel multiplier 2
  check_scan(lambda x: conv_nwc(x[None], w2, (dilation, 0), dilation,
                                groups=3)[0], X)


def dilated_stack(ws):
  def f(x):
    h = x[None]
    for i, w in enumerate(ws):
      d = 2 ** i
      h = jnp.tanh(conv_nwc(h, w, ((w.shape[0] - 1) * d, 0), d)) + h
    return h[0]
  return f


def test_dilated_stack_and_its_carry():
  L8 = 8
  xs = random_like(jnp.zeros((L8, 3)))
  ws = [random_like(jnp.zeros((2, 3, 3)), seed=10 + i) for i in range(3)]
  fun = dilated_stack(ws)
  check_scan(fun, xs, prefill_lengths=range(L8 + 1))
  # one ring per layer of (K - 1) * dilation elements, plus the position
  spec = scanagram.to_step(fun, xs).carry_spec()
  leaves = jax.tree.leaves(spec)
  rings = sorted(leaf.shape for leaf in leaves if leaf.shape != ())
  assert rings == sorted([(1, 1, 3), (1, 2, 3), (1, 4, 3)]), spec
  assert [leaf.shape for leaf in leaves].count(()) == 1, spec
  _, init = scanagram.as_scan(fun, xs)
  assert jax.tree.structure(init) == jax.tree.structure(spec)


def test_conv_padding_delays_more():
  # (reach + 1, 0): the output runs one element behind, y[t] uses x[t-1]...
  w = random_like(jnp.zeros((3, 3, 2)), seed=8)
  check_scan(lambda x: conv_nwc(x[None], w, (3, 0))[0][:L], X,
             prefill_lengths=range(L + 1))
  check_scan(lambda x: conv_nwc(x[None], w, (6, 0), 2)[0][:L], X)
  # a delayed conv of a delayed conv
  check_scan(lambda x: conv_nwc(conv_nwc(x[None], w, (4, 0))[:, :L],
                                w[:, :2, :], (3, 0))[0][:L], X)


def test_conv_symmetric_padding_then_slice():
  w = random_like(jnp.zeros((3, 3, 2)), seed=9)
  check_scan(lambda x: conv_nwc(x[None], w, (2, 2))[0][:L], X,
             prefill_lengths=range(L + 1))
  check_scan(lambda x: conv_nwc(x[None], w, (4, 4), 2)[0][:L], X)


def test_conv_of_a_shifted_input():
  w = random_like(jnp.zeros((2, 3, 2)), seed=11)

  def f(x):
    shifted = jnp.concatenate([jnp.zeros((1, 3)), x[:-1]])
    return conv_nwc(shifted[None], w, (1, 0))[0]
  check_scan(f, X, prefill_lengths=range(L + 1))


def test_anti_causal_conv_refused():
  w = random_like(jnp.zeros((3, 3, 2)))
  check_refused(lambda x: conv_nwc(x[None], w, (0, 2))[0], X,
                "conv_general_dilated", "padding along the scanned axis")
  check_refused(lambda x: conv_nwc(x[None], w, (1, 1))[0], X,
                "conv_general_dilated")


def test_strided_conv_refused():
  w = random_like(jnp.zeros((2, 3, 2)))
  check_refused(lambda x: lax.conv_general_dilated(
      x[None], w, (2,), [(1, 0)],
      dimension_numbers=("NWC", "WIO", "NWC"))[0], X,
      "conv_general_dilated", "strides")
