"""Grouped-query and multi-query attention cache the keys and values at the
key/value head count (before they are repeated over query heads), and score
products written with the keys as the left operand convert."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import (assert_trees_close, check_refused, check_scan,
                      random_like, window_mask)

L, D, KV, G = 7, 8, 2, 3   # time, head size, key/value heads, group size
H = KV * G                 # query heads
MODEL = 12
W = jax.random.normal(jax.random.key(3), (4, MODEL, H * D)) / 4


def project(x, heads, i):
  """``[T, MODEL] -> [T, heads, D]``."""
  return (x @ W[i][:, :heads * D]).reshape(x.shape[0], heads, D)


def softmax_attention(q, k, v, mask):   # q, k, v: [T, H, D]
  logits = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(D)
  logits = jnp.where(mask, logits, -1e9)
  return jnp.einsum("hts,shd->thd", jax.nn.softmax(logits, -1), v)


def repeat_kv(x):
  return jnp.repeat(project(x, KV, 1), G, axis=1), jnp.repeat(
      project(x, KV, 2), G, axis=1)


def tile_kv(x):
  return (jnp.tile(project(x, KV, 1), (1, G, 1)),
          jnp.tile(project(x, KV, 2), (1, G, 1)))


def broadcast_kv(x):   # multi-query: one key/value head for all
  k, v = project(x, 1, 1)[:, 0], project(x, 1, 2)[:, 0]
  return (jnp.broadcast_to(k[:, None], (x.shape[0], H, D)),
          jnp.broadcast_to(v[:, None], (x.shape[0], H, D)))


def decoder(expand, mask=None):
  def f(x):
    k, v = expand(x)
    m = jnp.tril(jnp.ones((x.shape[0],) * 2, bool)) if mask is None else (
        mask(x.shape[0]))
    out = softmax_attention(project(x, H, 0), k, v, m)
    return out.reshape(x.shape[0], H * D) @ W[3].T
  return f


def buffers(carry):
  """The buffers' shapes, axes of size 1 left out (a row's function may
  keep its batch axis of 1)."""
  return sorted(tuple(n for n in np.shape(x) if n != 1)
                for name, x in carry.items() if name != "position")


@pytest.mark.parametrize("expand,heads", [(repeat_kv, KV), (tile_kv, KV),
                                          (broadcast_kv, None)],
                         ids=["repeat", "tile", "multi-query"])
def test_cache_holds_key_value_heads(expand, heads):
  x = random_like(jnp.zeros((L, MODEL)))
  check_scan(decoder(expand), x)
  carry = scanagram.to_step(decoder(expand), x).init()
  # [heads, L, D] per buffer (heads first, as a hand-written cache), or
  # [L, D] for one shared head: never the H query heads
  want = (KV, L, D) if heads else (L, D)
  assert buffers(carry) == [want, want]


def test_grouped_einsum_with_keys_on_the_left():
  """``einsum("tkgd,skd->kgts")``: jnp.einsum puts the keys first in the
  dot_general; the queries are found from the mask on a second pass."""
  def f(x):
    q = project(x, H, 0).reshape(x.shape[0], KV, G, D)
    k, v = project(x, KV, 1), project(x, KV, 2)
    logits = jnp.einsum("tkgd,skd->kgts", q, k) / np.sqrt(D)
    logits = jnp.where(jnp.tril(jnp.ones((x.shape[0],) * 2, bool)), logits,
                       -1e9)
    out = jnp.einsum("kgts,skd->tkgd", jax.nn.softmax(logits, -1), v)
    return out.reshape(x.shape[0], H * D) @ W[3].T
  x = random_like(jnp.zeros((L, MODEL)))
  check_scan(f, x)
  assert buffers(scanagram.to_step(f, x).init()) == [(KV, L, D)] * 2


def test_keys_as_lhs_of_dot_general():
  """``k·qᵀ`` laid out ``[h, s, t]`` (keys before queries), masked in that
  layout and normalised over the keys (axis 1), as named einsums emit it."""
  def f(x):
    q, k, v = project(x, H, 0), project(x, H, 1), project(x, H, 2)
    logits = lax.dot_general(k, q, (((2,), (2,)), ((1,), (1,)))) / 3.0
    keep = jnp.triu(jnp.ones((x.shape[0],) * 2, bool))   # key s <= query t
    logits = jnp.where(keep, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=1)              # [h, s, t]
    out = jnp.einsum("hst,shd->thd", weights, v)
    return out.reshape(x.shape[0], H * D)
  check_scan(f, random_like(jnp.zeros((L, MODEL))))


def test_keys_as_lhs_with_no_causal_mask_keeps_the_first_refusal():
  """Swapping the roles does not make an anti-causal mask causal: the
  refusal is the one of the first conversion."""
  def f(x):
    q, k = project(x, H, 0), project(x, H, 1)
    logits = jnp.einsum("thd,shd->hts", q, k)
    logits = jnp.where(jnp.ones((x.shape[0],) * 2, bool), logits, -1e9)
    return jnp.einsum("hts,shd->thd", jax.nn.softmax(logits, -1),
                      project(x, H, 2)).reshape(x.shape[0], H * D)
  check_refused(f, jnp.zeros((L, MODEL)), "its mask keeps key 1 for query 0")


def test_grouped_sliding_window_ring_at_key_value_heads():
  x = random_like(jnp.zeros((L, MODEL)))
  f = decoder(repeat_kv, window_mask(3))
  check_scan(f, x)
  fns = scanagram.to_step(f, x)
  assert buffers(fns.init()) == [(KV, 3, D)] * 2
  assert fns.max_length is None


def test_grouped_rows_and_ragged_prompts():
  """With batch_axes and per-row prompt lengths."""
  B = 3
  def f(x):   # [B, T, MODEL]
    return jax.vmap(decoder(repeat_kv))(x)
  x = random_like(jnp.zeros((B, L, MODEL)))
  want = f(x)
  fns = scanagram.to_step(f, x, in_axes=1, out_axes=1, batch_axes=0,
                          out_batch_axes=0)
  assert buffers(fns.init()) == [(B, KV, L, D)] * 2
  lengths = np.array([2, 5, 0])
  carry, ys = fns.prefill(x[:, :5], lengths=lengths)
  for b, n in enumerate(lengths):
    assert_trees_close(ys[b, :n], want[b, :n])
  # each row goes on from its own prompt end
  for _ in range(2):
    pos = np.asarray(fns.positions(carry))
    element = x[np.arange(B), pos]
    carry, y = fns.step(carry, element)
    assert_trees_close(y, want[np.arange(B), pos])


def test_one_buffer_per_value_read_by_several_products():
  """Keys that are also the values, and a second layer attending over the
  first layer's keys (cross-layer KV sharing): one buffer for that value."""
  def f(x):
    q1, q2, k = project(x, H, 0), project(x, H, 1), project(x, H, 2)
    mask = jnp.tril(jnp.ones((x.shape[0],) * 2, bool))
    h = softmax_attention(q1, k, k, mask)                   # v is k
    h2 = softmax_attention(q2 + h, k, k, mask)              # reuses k
    return h2.reshape(x.shape[0], H * D)
  x = random_like(jnp.zeros((L, MODEL)))
  check_scan(f, x)
  assert buffers(scanagram.to_step(f, x).init()) == [(H, L, D)]


def test_grouped_keys_shared_between_layers():
  def f(x):
    q1, q2 = project(x, H, 0), project(x, H, 3)
    k, v = repeat_kv(x)
    mask = jnp.tril(jnp.ones((x.shape[0],) * 2, bool))
    h = softmax_attention(q1, k, v, mask)
    return softmax_attention(q2 + h, k, v, mask).reshape(x.shape[0], H * D)
  x = random_like(jnp.zeros((L, MODEL)))
  check_scan(f, x)
  assert buffers(scanagram.to_step(f, x).init()) == [(KV, L, D)] * 2
