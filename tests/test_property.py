"""Property: any composition of causal building blocks converts, and its
step matches the training mode for every prefill length (hypothesis draws
the composition)."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from jax import lax

import scanagram
from conftest import check_scan, random_like

L, D = 7, 3
W = jax.random.normal(jax.random.key(3), (D, D)) / 2
K = jax.random.normal(jax.random.key(4), (2, D, D)) / 2
POS = jax.random.normal(jax.random.key(5), (L, D))


def attention(x):
  logits = jnp.where(jnp.tril(jnp.ones((L, L), bool)), (x @ W) @ x.T, -1e9)
  return jax.nn.softmax(logits) @ x


def additive_attention(x):
  """Scores scaled by division, an ALiBi bias, an additive -inf mask."""
  pos = jnp.arange(L)
  bias = -0.5 * (pos[:, None] - pos[None, :]) + jnp.where(
      pos[:, None] >= pos[None, :], 0., -jnp.inf)
  return jax.nn.softmax((x @ W) @ x.T / 2.0 + bias) @ x


def window_attention(x):
  """A sliding window of 3 keys: the cache is a ring."""
  i, j = jnp.arange(L)[:, None], jnp.arange(L)[None, :]
  logits = jnp.where((j <= i) & (j > i - 3), (x @ W) @ x.T, -jnp.inf)
  return jax.nn.softmax(logits) @ x


def linear_recurrence(x):
  """h_t = sigmoid(x_t) * h_{t-1} + x_t, as a parallel scan."""
  return scanagram.associative_scan(
      lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (jax.nn.sigmoid(x), x))[1]


BLOCKS = {
    "tanh": jnp.tanh,
    "matmul": lambda x: x @ W,
    "shift": lambda x: jnp.concatenate([jnp.zeros((1, D)), x[:-1]]),
    "pad_shift2": lambda x: jnp.pad(x, ((2, 0), (0, 0)))[:L],
    "cumsum": lambda x: jnp.cumsum(x, 0) / L,
    "cummax": lambda x: lax.cummax(x, 0),
    "position": lambda x: x + POS,
    "conv": lambda x: lax.conv_general_dilated(
        x[None], K, (1,), [(2, 0)], rhs_dilation=(2,),
        dimension_numbers=("NWC", "WIO", "NWC"))[0],
    "rnn": lambda x: lax.scan(lambda h, a: (jnp.tanh(h @ W + a),) * 2,
                              jnp.zeros(D), x)[1],
    "transpose_roundtrip": lambda x: jnp.swapaxes(
        jnp.swapaxes(x, 0, 1) * 2, 0, 1),
    "attention": attention,
    "additive_attention": additive_attention,
    "window_attention": window_attention,
    "moving_max": lambda x: lax.reduce_window(
        x, -jnp.inf, lax.max, (3, 1), (1, 1), ((2, 0), (0, 0))),
    "moving_sum_dilated": lambda x: lax.reduce_window(
        x, 0., lax.add, (2, 1), (1, 1), ((2, 0), (0, 0)),
        window_dilation=(2, 1)) / 2,
    "linear_recurrence": linear_recurrence,
    "layernorm": lambda x: (x - x.mean(-1, keepdims=True)) / (
        x.std(-1, keepdims=True) + 1),
}


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=5),
       st.integers(0, L))
def test_composition_of_causal_blocks(names, prompt_length):
  def fun(x):
    for name in names:
      x = BLOCKS[name](x) + x * 0.5
    return x
  check_scan(fun, random_like(jnp.zeros((L, D)), seed=len(names)),
             prefill_lengths=[prompt_length], tol=1e-4)


B = 3


@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(sorted(BLOCKS)), min_size=1, max_size=4),
       st.lists(st.integers(0, L), min_size=B, max_size=B),
       st.lists(st.integers(1, L), min_size=1, max_size=3),
       st.randoms(use_true_random=False))
def test_ragged_rows_and_blocks(names, prompt_lengths, block_sizes, draw):
  """Rows at their own positions: a ragged prefill, then blocks of the drawn
  sizes with drawn per-row lengths; row b's outputs are the training mode's
  on row b's own sequence."""
  def fun(x):                                     # x: [L, D]
    for name in names:
      x = BLOCKS[name](x) + x * 0.5
    return x
  xs = random_like(jnp.zeros((B, L, D)), seed=len(names))
  fns = scanagram.to_step(jax.vmap(fun), xs, in_axes=1, out_axes=1,
                          batch_axes=0, out_batch_axes=0)
  want = jax.vmap(fun)(xs)
  positions = np.array(prompt_lengths)
  carry, out = fns.prefill(xs[:, :max(positions)], lengths=positions)
  for b, p in enumerate(positions):
    np.testing.assert_allclose(out[b, :p], want[b, :p], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(out[b, p:], 0)
  for k in block_sizes:
    lengths = np.array([draw.randint(0, min(k, L - int(p))) for p in positions])
    block = np.zeros((B, k, D), np.float32)
    for b, (p, n) in enumerate(zip(positions, lengths)):
      block[b, :n] = xs[b, p:p + n]
    carry, ys = fns.extend(carry, jnp.asarray(block), lengths=lengths)
    for b, (p, n) in enumerate(zip(positions, lengths)):
      np.testing.assert_allclose(ys[b, :n], want[b, p:p + n], atol=1e-4,
                                 rtol=1e-4)
      np.testing.assert_array_equal(ys[b, n:], 0)
    positions = positions + lengths
    np.testing.assert_array_equal(fns.positions(carry), positions)


ANTI_CAUSAL = {
    "reverse": lambda x: x[::-1],
    "shift_left": lambda x: jnp.concatenate([x[1:], jnp.zeros((1, D))]),
    "mean_over_time": lambda x: x - x.mean(0),
    "unmasked_attention": lambda x: jax.nn.softmax((x @ W) @ x.T) @ x,
    "future_conv": lambda x: lax.conv_general_dilated(
        x[None], K, (1,), [(0, 1)], dimension_numbers=("NWC", "WIO", "NWC"))[0],
    "roll": lambda x: jnp.roll(x, 1, axis=0),
    "reverse_scan": lambda x: scanagram.associative_scan(lax.add, x,
                                                         reverse=True),
    "reverse_cumsum": lambda x: jnp.cumsum(x[::-1], 0)[::-1],
    "future_pool": lambda x: lax.reduce_window(
        x, 0., lax.add, (3, 1), (1, 1), ((1, 1), (0, 0))),
}


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(BLOCKS)), max_size=3),
       st.sampled_from(sorted(ANTI_CAUSAL)),
       st.lists(st.sampled_from(sorted(BLOCKS)), max_size=3))
def test_one_anti_causal_block_is_always_refused(before, bad, after):
  import pytest
  import scanagram

  def fun(x):
    for name in before:
      x = BLOCKS[name](x) + x
    x = ANTI_CAUSAL[bad](x) + x
    for name in after:
      x = BLOCKS[name](x) + x
    return x
  with pytest.raises(scanagram.ScanConversionError, match="test_property.py"):
    scanagram.as_scan(fun, jnp.zeros((L, D)))
