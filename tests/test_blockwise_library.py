"""Block-wise attention written as a public block-wise library writes it
converts: a ``jax.custom_vjp`` around the forward, einops ``rearrange``
between layouts, a mask function ``mask_fn(b, h, q, k)`` vmapped over its
indices, the online softmax with ``-inf`` fills and ``isfinite`` guards,
grouped-query heads split off by a rearrange, a batch axis, and the
library's two ways of skipping key blocks: a ``fori_loop`` up to the
diagonal (causal) and a ``dynamic_slice`` of the blocks around a window."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops import rearrange

import scanagram

B, L, D, HQ, HKV, DH, BLOCK = 2, 16, 8, 4, 2, 2, 4


def materialize_mask(mask_fn, batch, hq, hkv, q_idx, k_idx):
  mask = jax.vmap(lambda b: jax.vmap(lambda q: jax.vmap(
      lambda h: jax.vmap(lambda k: mask_fn(b, h, q, k))(k_idx))(
          jnp.arange(hq)))(q_idx))(jnp.arange(batch))
  return rearrange(mask, "B Lq (Hkv G) Lk -> B Lq Hkv G Lk", Hkv=hkv)


def key_block_step(carry, q_idx, k_idx, q_block, k_block, v_block, mask_fn):
  """One key block of the online softmax, in the library's layouts."""
  high, normaliser, values = carry
  batch, _, hq, d = q_block.shape
  hkv = k_block.shape[2]
  q_block = rearrange(q_block, "B Lq (Hkv G) d -> B Lq Hkv G d", Hkv=hkv)
  mask = materialize_mask(mask_fn, batch, hq, hkv, q_idx, k_idx)
  high = rearrange(high, "B Lq (Hkv G) -> B Lq Hkv G 1", Hkv=hkv)
  normaliser = rearrange(normaliser, "B Lq (Hkv G) -> B Lq Hkv G 1", Hkv=hkv)
  values = rearrange(values, "B Lq (Hkv G) d -> B Lq Hkv G d", Hkv=hkv)
  scores = jnp.einsum("bqhgd,bkhd->bqhgk", q_block, k_block,
                      precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32) / jnp.sqrt(
                          jnp.float32(d))
  scores = jnp.where(mask, scores, -jnp.inf)
  new_high = jnp.maximum(high, jnp.max(scores, axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(new_high), new_high, 0.0)
  rescale = jnp.where(jnp.isfinite(high), jnp.exp(high - shift), 0.0)
  weights = jnp.exp(scores - shift)
  normaliser = rescale * normaliser + weights.sum(-1, keepdims=True)
  values = rescale * values + jnp.einsum("bqhgk,bkhd->bqhgd", weights,
                                         v_block)
  return (rearrange(new_high, "B Lq Hkv G 1 -> B Lq (Hkv G)"),
          rearrange(normaliser, "B Lq Hkv G 1 -> B Lq (Hkv G)"),
          rearrange(values, "B Lq Hkv G d -> B Lq (Hkv G) d"))


def query_block_values(q_idx, q_block, k, v, mask_fn, skipping, window):
  batch, lq, hq, d = q_block.shape
  k_blocks = rearrange(k, "B (n b) H d -> n B b H d", b=BLOCK)
  v_blocks = rearrange(v, "B (n b) H d -> n B b H d", b=BLOCK)
  k_indices = rearrange(jnp.arange(k.shape[1]), "(n b) -> n b", b=BLOCK)
  init = (jnp.full((batch, lq, hq), -jnp.inf), jnp.zeros((batch, lq, hq)),
          jnp.zeros((batch, lq, hq, d)))
  if skipping == "window":
    start = jnp.maximum(0, (q_idx[0] - window) // BLOCK)
    n = -(-(window + BLOCK) // BLOCK) + 1
    k_indices, k_blocks, v_blocks = (
        jax.lax.dynamic_slice_in_dim(a, start, n, axis=0)
        for a in (k_indices, k_blocks, v_blocks))
  if skipping == "causal":
    upper = jnp.minimum(q_idx[-1] // BLOCK + 1, k_indices.shape[0])
    carry = jax.lax.fori_loop(0, upper, lambda i, c: key_block_step(
        c, q_idx, k_indices[i], q_block, k_blocks[i], v_blocks[i], mask_fn),
                              init)
  else:
    carry, _ = jax.lax.scan(lambda c, blocks: (key_block_step(
        c, q_idx, blocks[0], q_block, blocks[1], blocks[2], mask_fn), None),
                            init, (k_indices, k_blocks, v_blocks))
  _, normaliser, values = carry
  safe = jnp.where(normaliser > 0, normaliser, 1.0)
  return jnp.where(normaliser[..., None] > 0, values / safe[..., None], 0.0)


def forward(q, k, v, mask_fn, skipping, window):
  q_blocks = rearrange(q, "B (n b) H d -> n B b H d", b=BLOCK)
  q_idx = jnp.arange(q.shape[1]).reshape(-1, BLOCK)
  out = jax.lax.map(lambda a: query_block_values(
      a[0], a[1], k, v, mask_fn, skipping, window), (q_idx, q_blocks))
  return rearrange(out, "n B b H d -> B (n b) H d")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def attention(q, k, v, mask_fn, skipping, window):
  return forward(q, k, v, mask_fn, skipping, window)


def _fwd(q, k, v, mask_fn, skipping, window):
  return forward(q, k, v, mask_fn, skipping, window), (q, k, v)


def _bwd(mask_fn, skipping, window, res, g):
  _, vjp = jax.vjp(lambda *a: forward(*a, mask_fn, "none", window), *res)
  return vjp(g)


attention.defvjp(_fwd, _bwd)


def decoder(skipping, window=None):
  def mask_fn(b, h, q, k):
    keep = q >= k
    return keep if window is None else keep & (q - k <= window)

  def apply(params, x):   # x: [B, L, D]
    q = jnp.einsum("bld,dhe->blhe", x, params["q"])
    k = jnp.einsum("bld,dhe->blhe", x, params["k"])
    v = jnp.einsum("bld,dhe->blhe", x, params["v"])
    out = attention(q, k, v, mask_fn, skipping, window)
    return x + out.reshape(x.shape[0], x.shape[1], -1) @ params["o"]
  return apply


def reference(params, x, window=None):
  q = jnp.einsum("bld,dhe->blhe", x, params["q"])
  k = jnp.repeat(jnp.einsum("bld,dhe->blhe", x, params["k"]), HQ // HKV, 2)
  v = jnp.repeat(jnp.einsum("bld,dhe->blhe", x, params["v"]), HQ // HKV, 2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH)
  i = jnp.arange(x.shape[1])
  keep = i[:, None] >= i[None, :]
  if window is not None:
    keep &= i[:, None] - i[None, :] <= window
  logits = jnp.where(keep, logits, -1e9)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
  return x + out.reshape(x.shape[0], x.shape[1], -1) @ params["o"]


KEY = jax.random.key(0)
PARAMS = {name: jax.random.normal(jax.random.fold_in(KEY, i), shape) * 0.3
          for i, (name, shape) in enumerate([
              ("q", (D, HQ, DH)), ("k", (D, HKV, DH)), ("v", (D, HKV, DH)),
              ("o", (HQ * DH, D))])}
X = jax.random.normal(KEY, (B, L, D))


@pytest.mark.parametrize("skipping,window", [
    ("none", None), ("causal", None), ("none", 5), ("window", 5)])
def test_library_style_blockwise_decoder_steps_as_training(skipping, window):
  fun = decoder(skipping, window)
  want = fun(PARAMS, X)
  np.testing.assert_allclose(want, reference(PARAMS, X, window), rtol=1e-5,
                             atol=1e-5)
  pair = scanagram.to_step(fun, PARAMS, X, in_axes=(None, 1), out_axes=1)
  for prompt in (1, 9):
    carry, ys = pair.prefill(PARAMS, X[:, :prompt])
    np.testing.assert_allclose(ys, want[:, :prompt], rtol=1e-5, atol=1e-5)
    for t in range(prompt, prompt + 4):
      carry, y = pair.step(PARAMS, carry, X[:, t])
      np.testing.assert_allclose(y, want[:, t], rtol=1e-5, atol=1e-5)
  # the carry is the KV cache at the key/value head count (a ring of the
  # window's keys under a window)
  keys = L if window is None else window + 1
  shapes = sorted(a.shape for a in jax.tree.leaves(pair.carry_spec()))
  assert shapes == [(), (B, HKV, keys, DH), (B, HKV, keys, DH)], shapes
