"""Automatic KV cache: ordinary causal attention converts with no decorator,
and every unsound variant is refused."""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanagram
from conftest import check_refused, check_scan, random_like

L, D = 6, 4
W = jax.random.normal(jax.random.key(1), (3, D, D)) / 2


def qkv(x):
  return x @ W[0], x @ W[1], x @ W[2]


def einsum_attention(mask, fill=-1e9, scale=0.5):
  def f(x):
    q, k, v = qkv(x)
    logits = jnp.einsum("td,sd->ts", q, k) * scale
    logits = jnp.where(mask(x.shape[0]), logits, fill)
    return jax.nn.softmax(logits, axis=-1) @ v
  return f


def tril_mask(n):
  return jnp.tril(jnp.ones((n, n), bool))


def iota_mask(n):
  pos = jnp.arange(n)
  return pos[:, None] >= pos[None, :]


NUMPY_MASK = np.tril(np.ones((L, L), bool))


@pytest.mark.parametrize("mask", [tril_mask, iota_mask, lambda n: NUMPY_MASK,
                                  lambda n: jnp.asarray(NUMPY_MASK)],
                         ids=["tril", "iota", "numpy", "jax-constant"])
@pytest.mark.parametrize("fill", [-1e9, -jnp.inf, -1e30])
def test_einsum_attention_converts(mask, fill):
  check_scan(einsum_attention(mask, fill), random_like(jnp.zeros((L, D))),
             prefill_lengths=range(L + 1))


def test_matmul_form_with_float_mask_multiplication():
  """Causal masking by multiplying weights with a 0/1 mask also proves."""
  def f(x):
    q, k, v = qkv(x)
    weights = jax.nn.sigmoid(q @ k.T * 0.5) * jnp.tril(jnp.ones((L, L)))
    return weights @ v
  check_scan(f, random_like(jnp.zeros((L, D))))


@pytest.mark.parametrize("fill", [-1e9, -jnp.inf])
def test_sigmoid_attention_with_a_fill_converts(fill):
  """sigmoid of a fill below -1e4 is exactly 0 (no softmax, no sum over
  the keys): the values of future keys cannot reach the output."""
  def f(x):
    q, k, v = qkv(x)
    logits = jnp.where(tril_mask(L), q @ k.T * 0.5, fill)
    return jax.nn.sigmoid(logits) @ v
  check_scan(f, random_like(jnp.zeros((L, D))), prefill_lengths=(0, 3, L))


def test_carry_is_the_kv_cache():
  fns = scanagram.to_step(einsum_attention(tril_mask), jnp.zeros((64, D)))
  leaves = jax.tree.leaves(fns.carry_spec())
  kv_bytes = 2 * 64 * D * 4
  carry_bytes = sum(l.size * l.dtype.itemsize for l in leaves)
  assert carry_bytes <= kv_bytes + 16, jax.tree.map(
      lambda l: l.shape, fns.carry_spec())


def _heads(x, n):  # [B, T, D] -> [B, T, n, D // n]
  return x.reshape(x.shape[0], x.shape[1], n, -1)


def test_batch_and_heads_time_axis_1_several_layers():
  """Batch-major [B, T, D], 2 heads, 2 layers: time axis 1 inside fun."""
  def f(xs):  # xs: [T, B, D] scanned along 0, moved to axis 1 inside
    h = jnp.swapaxes(xs, 0, 1)
    for layer in range(2):
      q, k, v = (_heads(h @ W[i] * (layer + 1), 2) for i in range(3))
      logits = jnp.einsum("bthd,bshd->bhts", q, k)
      mask = jnp.tril(jnp.ones((1, 1, L, L), bool))
      logits = jnp.where(mask, logits, -1e9)
      out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), v)
      h = h + out.reshape(h.shape)
    return jnp.swapaxes(h, 0, 1)
  check_scan(f, random_like(jnp.zeros((L, 3, D))), prefill_lengths=range(L + 1))


def _dpa(**kwargs):
  def f(x):
    q, k, v = (_heads(t[None], 2) for t in qkv(x))
    return jax.nn.dot_product_attention(q, k, v, **kwargs)[0].reshape(L, D)
  return f


def test_dot_product_attention_is_causal():
  check_scan(_dpa(is_causal=True), random_like(jnp.zeros((L, D))))


def test_dot_product_attention_with_mask_argument():
  mask = jnp.tril(jnp.ones((1, 1, L, L), bool))
  check_scan(_dpa(mask=mask), random_like(jnp.zeros((L, D))))


def test_dot_product_attention_local_window():
  check_scan(_dpa(is_causal=True, local_window_size=(2, 0)),
             random_like(jnp.zeros((L, D))))


def test_dot_product_attention_grouped_query_heads():
  def f(x):
    q = _heads((x @ W[0])[None], 4)
    k = _heads((x @ W[1])[None, :, :2], 2)
    v = _heads((x @ W[2])[None, :, :2], 2)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)[0].reshape(
        L, D)
  check_scan(f, random_like(jnp.zeros((L, D))))


def test_haiku_multi_head_attention_block():
  """A transformer block with hk.MultiHeadAttention and a causal mask."""
  def block(x):  # x: [T, B, D]
    h = jnp.swapaxes(x, 0, 1)
    mask = jnp.tril(jnp.ones((1, 1, L, L)))
    ln = hk.LayerNorm(-1, True, True)
    h = h + hk.MultiHeadAttention(2, 2, w_init_scale=1.0)(
        ln(h), ln(h), ln(h), mask=mask)
    h = h + hk.nets.MLP([8, D])(hk.LayerNorm(-1, True, True)(h))
    return jnp.swapaxes(h, 0, 1)
  model = hk.without_apply_rng(hk.transform(block))
  x = random_like(jnp.zeros((L, 2, D)))
  params = model.init(jax.random.key(0), x)
  check_scan(lambda xs: model.apply(params, xs), x)


# -- unsound variants: refused ------------------------------------------------
def _x():
  return jnp.zeros((L, D))


def test_no_mask_refused():
  def f(x):
    q, k, v = qkv(x)
    return jax.nn.softmax(q @ k.T) @ v
  check_refused(f, _x(), "reduce_max", "no causal mask")


def test_transposed_mask_refused():
  check_refused(einsum_attention(lambda n: jnp.triu(jnp.ones((n, n), bool))),
                _x(), "select_n", "keeps key 1 for query 0")


def test_one_future_step_refused():
  check_refused(
      einsum_attention(lambda n: jnp.tril(jnp.ones((n, n), bool), k=1)),
      _x(), "select_n", "a future position")


def test_zero_fill_refused():
  check_refused(einsum_attention(tril_mask, fill=0.0), _x(), "dot_general",
                "not provably zero")


def test_mask_leaving_a_row_empty_refused():
  """A strictly-past mask fills all of row 0: softmax then weighs every key
  equally, the future ones too, so the training mode is not causal there."""
  pos = jnp.arange(L)
  check_refused(einsum_attention(lambda n: pos[:, None] > pos[None, :]),
                _x(), "select_n", "keeps no key at all for query 0")


def test_mask_from_an_input_refused():
  def f(mask, x):
    q, k, v = qkv(x)
    logits = jnp.where(mask, q @ k.T, -1e9)
    return jax.nn.softmax(logits) @ v
  with pytest.raises(scanagram.ScanConversionError, match="cannot check"):
    scanagram.to_step(f, NUMPY_MASK, _x(), in_axes=(None, 0))


def test_dot_product_attention_without_causal_refused():
  check_refused(_dpa(), _x(), "no causal mask")


# -- sliding windows: a ring of w keys ----------------------------------------
def window_mask(n, w):
  pos = jnp.arange(n)
  return (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < w)


@pytest.mark.parametrize("w", [1, 2, 3])
def test_sliding_window_converts(w):
  check_scan(einsum_attention(lambda n: window_mask(n, w)),
             random_like(jnp.zeros((L, D))), prefill_lengths=range(L + 1))


def _carry_bytes(fns):
  return sum(l.size * l.dtype.itemsize
             for l in jax.tree.leaves(fns.carry_spec()))


def test_window_of_4_at_L_64_shrinks_the_carry():
  full = scanagram.to_step(einsum_attention(tril_mask), jnp.zeros((64, D)))
  ring = scanagram.to_step(einsum_attention(lambda n: window_mask(n, 4)),
                           jnp.zeros((64, D)))
  assert _carry_bytes(ring) * 4 <= _carry_bytes(full)


def test_dot_product_attention_local_window_uses_a_ring():
  def f(x):
    q, k, v = (_heads(t[None], 2) for t in qkv(x))
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=(3, 0))[0].reshape(
            x.shape[0], D)
  x = random_like(jnp.zeros((16, D)))
  check_scan(f, x, prefill_lengths=[0, 2, 3, 9, 16])
  fns = scanagram.to_step(f, x)
  buffers = [l.shape for l in jax.tree.leaves(fns.carry_spec()) if l.ndim == 4]
  assert buffers  # [B, H, time, dh]: the window (3 back + the current key)
  assert all(s[2] == 4 for s in buffers), buffers


def test_window_with_a_bias_table():
  """An unscanned [L, L] bias over the keys is gathered at the ring's slots."""
  bias = jax.random.normal(jax.random.key(5), (L, L))

  def f(x):
    q, k, v = qkv(x)
    logits = q @ k.T + bias
    logits = jnp.where(window_mask(L, 2), logits, -jnp.inf)
    return jax.nn.softmax(logits) @ v
  check_scan(f, random_like(jnp.zeros((L, D))), prefill_lengths=range(L + 1))


def _shifted(x, n):
  """x delayed by n positions: element t is x[t - n] (zeros before)."""
  return jnp.pad(x, ((n, 0), (0, 0)))[:x.shape[0]]


@pytest.mark.parametrize("w", [None, 3])
@pytest.mark.parametrize("shift", ["keys", "values", "all"])
@pytest.mark.parametrize("n", [1, 2])
def test_shifted_keys_and_values(n, shift, w):
  """Keys or values delayed by n run ahead of the input in the step: its last
  n steps compute elements past the end, which must not be written over the
  buffer's (or the ring's) last entries."""
  mask = tril_mask(L) if w is None else window_mask(L, w)

  def f(x):
    q, k, v = qkv(_shifted(x, n) if shift == "all" else x)
    if shift == "keys":
      k = _shifted(k, n)
    elif shift == "values":
      v = _shifted(v, n)
    logits = jnp.where(mask, q @ k.T, -1e9)
    return jax.nn.softmax(logits) @ v
  check_scan(f, random_like(jnp.zeros((L, D))), prefill_lengths=[0, L - 1, L])


# -- additive masks and attention weights as outputs --------------------------
def additive_attention(mask, fill=-1e9):
  def f(x):
    q, k, v = qkv(x)
    return jax.nn.softmax(q @ k.T + jnp.where(mask, 0., fill)) @ v
  return f


@pytest.mark.parametrize("fill", [-1e9, -jnp.inf])
def test_additive_causal_mask_converts(fill):
  check_scan(additive_attention(tril_mask(L), fill), _x(),
             prefill_lengths=range(L + 1))


def test_additive_window_mask_uses_a_ring():
  f = additive_attention(window_mask(16, 3))
  x = random_like(jnp.zeros((16, D)))
  check_scan(f, x, prefill_lengths=[0, 2, 9, 16])
  fns = scanagram.to_step(f, x)
  buffers = [l.shape for l in jax.tree.leaves(fns.carry_spec()) if l.ndim]
  assert buffers and all(sorted(s) == sorted((3, D)) for s in buffers), buffers


def test_dot_product_attention_with_a_causal_bias():
  def f(x):
    q, k, v = (_heads(t[None], 2) for t in qkv(x))
    bias = jnp.where(tril_mask(L), 0., -1e9)[None, None]
    return jax.nn.dot_product_attention(q, k, v, bias=bias)[0].reshape(L, D)
  check_scan(f, _x())


def test_additive_masks_that_are_not_causal_refused():
  pos = jnp.arange(L)
  check_refused(additive_attention(pos[:, None] > pos[None, :]), _x(),
                "add", "keeps no key at all for query 0")
  check_refused(additive_attention(tril_mask(L).T), _x(), "reduce_max",
                "no causal mask")
  check_refused(additive_attention(tril_mask(L), fill=-1.0), _x(),
                "reduce_max", "no causal mask")


def test_sum_over_additively_masked_scores_refused():
  """Scores plus -1e9 at the future keys are large in both modes but not the
  same number: a sum over the keys would differ."""
  def f(x):
    q, k, _ = qkv(x)
    return (q @ k.T + jnp.where(tril_mask(L), 0., -1e9)).sum(-1)
  check_refused(f, _x(), "reduce_sum", "masked by addition")


def test_two_masks_on_one_score_refused():
  """Whether every row keeps a key depends on both masks together; scanagram
  proves one mask per score and says so."""
  def f(x):
    q, k, v = qkv(x)
    logits = q @ k.T + jnp.where(tril_mask(L), 0., -1e9)
    return jax.nn.softmax(jnp.where(tril_mask(L), logits, -1e9)) @ v
  check_refused(f, _x(), "select_n", "already masked")


def test_attention_weights_as_an_output():
  def f(x):
    q, k, v = qkv(x)
    weights = jax.nn.softmax(jnp.where(tril_mask(L), q @ k.T, -1e9))
    return weights @ v, weights
  check_scan(f, _x(), prefill_lengths=range(L + 1))


def test_weights_of_a_window_as_an_output_keep_full_buffers():
  """A ring holds the window's keys in slot order, not the sequence's, so
  weights returned as an output need the full buffers."""
  def f(x):
    q, k, v = qkv(x)
    weights = jax.nn.softmax(jnp.where(window_mask(16, 2), q @ k.T, -1e9))
    return weights @ v, weights
  x = random_like(jnp.zeros((16, D)))
  check_scan(f, x, prefill_lengths=[0, 5, 16])
  fns = scanagram.to_step(f, x)
  assert all(16 in l.shape for l in jax.tree.leaves(fns.carry_spec())
             if l.ndim)  # full buffers, not rings


def test_multiplying_possibly_infinite_scores_by_zero_refused():
  """log of the scores can be -inf where the step's buffer is still empty:
  0 · -inf is NaN, so the multiplicative mask proves nothing there."""
  def f(x):
    q, k, v = qkv(x)
    weights = jnp.log(jnp.abs(q @ k.T)) * jnp.tril(jnp.ones((L, L)))
    return weights @ v
  check_refused(f, _x(), "dot_general", "no causal mask")


# -- scaled scores and position schemes ---------------------------------------
def test_additive_mask_after_dividing_by_a_constant():
  """scores / sqrt(d) stay finite where the step's buffer is empty, so an
  additive mask after the division is proven as before it."""
  def f(x, divisor=np.sqrt(D)):
    q, k, v = qkv(x)
    logits = q @ k.T / divisor + jnp.where(tril_mask(L), 0., -1e9)
    return jax.nn.softmax(logits) @ v
  check_scan(f, _x(), prefill_lengths=range(L + 1))
  # dividing by 0 at the future keys may give inf there: nothing is proven
  check_refused(lambda x: f(x, divisor=tril_mask(L).astype(jnp.float32)),
                _x(), "reduce_max", "no causal mask")


H = 2
POS = jnp.arange(L)
ALIBI = -jnp.array([0.5, 0.25])[:, None, None] * (POS[:, None] - POS)[None]


def rope(x):                               # x: [T, H, dh]
  half = x.shape[-1] // 2
  angles = POS[:, None] / 10.0 ** (jnp.arange(half) / half)
  sin, cos = jnp.sin(angles)[:, None], jnp.cos(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def multi_head(x, bias=0.0, mask="where", position=None):
  q, k, v = (t.reshape(L, H, D // H) for t in qkv(x))
  if position is not None:
    q, k = position(q), position(k)
  logits = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(D // H) + bias
  if mask == "where":
    logits = jnp.where(tril_mask(L), logits, -jnp.inf)
  else:
    logits = logits + jnp.where(tril_mask(L), 0., -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("hts,shd->thd", weights, v).reshape(L, D)


@pytest.mark.parametrize("case", ["alibi", "alibi additive", "rope"])
def test_position_schemes_convert(case):
  f = {"alibi": lambda x: multi_head(x, ALIBI),
       "alibi additive": lambda x: multi_head(x, ALIBI, mask="add"),
       "rope": lambda x: multi_head(x, position=rope)}[case]
  check_scan(f, _x(), prefill_lengths=[0, 2, L])


def test_learned_relative_position_bias_as_a_parameter():
  """A T5-style bias: a learned table indexed by i - j, a step input."""
  def f(table, x):
    return multi_head(x, table[:, POS[:, None] - POS[None, :] + L])

  table = random_like(jnp.zeros((H, 2 * L)), 7)
  fns = scanagram.to_step(f, table, _x(), in_axes=(None, 0))
  want = f(table, _x())
  carry, out = fns.prefill(table, _x()[:2])
  np.testing.assert_allclose(out, want[:2], atol=1e-5)
  for t in range(2, L):
    carry, y = fns.step(table, carry, _x()[t])
    np.testing.assert_allclose(y, want[t], atol=1e-5)


def test_mixed_precision_weights_cast_to_bfloat16():
  """Softmax in float32, weights cast to bfloat16 for the value product."""
  def f(x):
    q, k, v = (t.astype(jnp.bfloat16) for t in qkv(x))
    logits = jnp.where(tril_mask(L), (q @ k.T).astype(jnp.float32), -1e9)
    weights = jax.nn.softmax(logits).astype(jnp.bfloat16)
    return (weights @ v).astype(jnp.float32)
  check_scan(f, _x(), prefill_lengths=[0, 3, L], tol=2e-2)
