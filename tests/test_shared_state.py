"""One state per distinct scanned value: a value read by several
convolutions keeps one ring (sized by the longest window), and shifts of one
value by 1, 2, 3 (a convolution written as shifted sums, as Griffin's
``Conv1D`` does) keep one past of 3 elements."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram
from conftest import assert_trees_close, check_scan, random_like

T, D = 9, 4
W = jax.random.normal(jax.random.key(0), (4, D))
K = jax.random.normal(jax.random.key(1), (2, 5, D, D)) / 2


def state_shapes(fns, x):
  return sorted(np.shape(leaf) for leaf in jax.tree.leaves(fns.init())
                if np.ndim(leaf))


def shifted_sums(x, width=4, fill=0.0):
  """Griffin's Conv1D: ``sum_s pad(x[:T - s], (s, 0)) * w[width - s - 1]``."""
  out = x * W[width - 1]
  for shift in range(1, width):
    window = jnp.pad(x[:x.shape[0] - shift], ((shift, 0), (0, 0)),
                     constant_values=fill)
    out = out + window * W[width - shift - 1]
  return out


def test_shifted_sums_keep_one_past_of_the_widest_shift():
  x = random_like(jnp.zeros((T, D)))
  check_scan(shifted_sums, x, prefill_lengths=(0, 2, 5, T))
  assert state_shapes(scanagram.to_step(shifted_sums, x), x) == [(3, D)]


def test_shift_with_a_fill_and_pointwise_work_on_both_sides():
  """tanh before the shift, a scale after it, a nonzero fill: the first
  elements are f(fill), as in the training mode."""
  def f(x):
    h = jnp.tanh(x)
    a = jnp.pad(h[:-1], ((1, 0), (0, 0)), constant_values=2.0) * 3.0
    b = jnp.pad(h[:-2], ((2, 0), (0, 0)), constant_values=2.0) * W[0]
    return x + a + b
  x = random_like(jnp.zeros((T, D)))
  check_scan(f, x, prefill_lengths=(0, 2, 5, T))
  assert state_shapes(scanagram.to_step(f, x), x) == [(2, D)]


def griffin_conv(x, width=4):
  """Griffin's Conv1D as recurrentgemma writes it: each shifted window is
  multiplied by a document mask (varying along time) before it is
  concatenated after zeros."""
  length = x.shape[0]
  not_a_boundary = (jnp.arange(length) % 5 != 0).astype(jnp.int32)
  out = 0.0
  for shift in range(width):
    mask = jnp.ones((length - shift,))
    for k in range(1, shift + 1):
      mask = mask * not_a_boundary[k:length - shift + k]
    window = x[:length - shift] * mask[:, None].astype(x.dtype)
    window = jnp.concatenate([jnp.zeros((shift, D), x.dtype), window], 0)
    out = out + window * W[width - shift - 1]
  return out


def test_masked_windows_after_concatenation_keep_one_past():
  x = random_like(jnp.zeros((T, D)))
  check_scan(griffin_conv, x, prefill_lengths=range(T + 1))
  assert state_shapes(scanagram.to_step(griffin_conv, x), x) == [(3, D)]


def test_a_delayed_value_read_by_several_equations_keeps_one_past():
  """v runs 2 ahead and is not a pointwise function of a shift (a running
  sum): three equations delay it, by 2, 2 and 1, from one past of 2."""
  def f(x):
    v = jnp.cumsum(jnp.pad(x[:-2], ((2, 0), (0, 0))), 0)
    late = jnp.pad(x[:-1], ((1, 0), (0, 0)))
    return jnp.sin(x + v) * (x * v) + jnp.cumsum(late, 0) * v
  x = random_like(jnp.zeros((T, D)))
  # prefills up to T - 1 then a step: v's block stops short at the end
  check_scan(f, x, prefill_lengths=range(T + 1))
  # two running sums (one element each), one past of v (not 2 + 2 + 1),
  # and one of the last product, which runs 1 ahead of the sine
  assert state_shapes(scanagram.to_step(f, x), x) == [(1, D), (1, D),
                                                       (1, D), (2, D)]


def test_shifted_sums_with_ragged_rows():
  B = 3
  f = jax.vmap(shifted_sums)
  x = random_like(jnp.zeros((B, T, D)))
  want = f(x)
  fns = scanagram.to_step(f, x, in_axes=1, out_axes=1, batch_axes=0,
                          out_batch_axes=0)
  lengths = np.array([0, 4, 7])
  carry, ys = fns.prefill(x[:, :7], lengths=lengths)
  for b, n in enumerate(lengths):
    assert_trees_close(ys[b, :n], want[b, :n])
  block = jnp.stack([x[b, n:n + 2] for b, n in enumerate(lengths)])
  carry, ys = fns.extend(carry, block, lengths=np.array([2, 2, 2]))
  for b, n in enumerate(lengths):
    assert_trees_close(ys[b], want[b, n:n + 2])


def conv(x, kernel, width):
  """A causal convolution of x: [T, D] along time."""
  return lax.conv_general_dilated(
      x[None], kernel[:width], (1,), [(width - 1, 0)],
      dimension_numbers=("NWC", "WIO", "NWC"))[0]


def test_gated_convolutions_of_one_input_share_a_ring():
  def f(x):
    return jnp.tanh(conv(x, K[0], 5)) * jax.nn.sigmoid(conv(x, K[1], 5))
  x = random_like(jnp.zeros((T, D)))
  check_scan(f, x, prefill_lengths=(0, 2, 5, T))
  # ([1, 4, D]: the convolution's batch axis of 1)
  assert state_shapes(scanagram.to_step(f, x), x) == [(1, 4, D)]


def test_convolutions_of_different_widths_share_the_longest_ring():
  def f(x):
    return conv(x, K[0], 2) + conv(x, K[1], 5) * conv(x, K[0], 3)
  x = random_like(jnp.zeros((T, D)))
  check_scan(f, x, prefill_lengths=(0, 2, 5, T))
  assert state_shapes(scanagram.to_step(f, x), x) == [(1, 4, D)]
