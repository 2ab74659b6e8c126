"""Block-wise (tiled) attention converts with no change to the code: queries
in blocks (``lax.map`` over a reshape of the time axis), keys and values in
blocks (a ``lax.scan`` whose carry sums ``exp(q·k / sqrt(d)) * mask``), the
mask a function of the query and key indices. The step is the plain
KV-cache step (scanagram.untile rewrites the blocks over whole axes first)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import check_refused, check_scan

L, D, KV, G = 12, 4, 2, 2   # time, head size, key/value heads, group size
H = KV * G                  # query heads
MODEL = 8
W = jax.random.normal(jax.random.key(5), (3, MODEL, H * D)) / 3


def causal(i, j):
  return i >= j


def window(w):
  return lambda i, j: (i >= j) & (i - j < w)


def blockwise_attention(q, k, v, block, mask_fn, form="kernel", skip=None,
                        window_blocks=None):
  """q ``[T, H, D]``, k and v ``[T, KV, D]``; the sequence padded to a
  multiple of ``block``, padded keys masked, padded queries dropped.
  ``form``: "kernel" (running sums of ``exp(q·k / sqrt(d)) * mask``) or
  "online" (the online softmax: a running maximum rescales the sums, -inf
  fill, guards against a row with no key yet, as flash attention writes
  it). ``skip(last_query) -> blocks``: visit only that many key blocks
  (a ``fori_loop`` with that upper bound: causal block skipping).
  ``window_blocks``: ``(left, n)``: visit the n key blocks from the one
  holding the block's first query minus ``left`` (a ``dynamic_slice`` of
  the key blocks: sliding-window block skipping)."""
  length, heads, d = q.shape
  kv_heads = k.shape[1]
  group = heads // kv_heads
  n = -(-length // block)
  pad = n * block - length
  if pad:
    q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0))) for a in (q, k, v))
  index = jnp.arange(n * block).reshape(n, block)
  q_blocks = q.reshape(n, block, kv_heads, group, d)
  k_blocks = k.reshape(n, block, kv_heads, d)
  v_blocks = v.reshape(n, block, kv_heads, d)

  def query_block(args):
    q_index, q_block = args

    def key_block(carry, blocks):
      k_index, k_block, v_block = blocks
      scores = jnp.einsum("qhgd,khd->qhgk", q_block, k_block) / np.sqrt(d)
      mask = (mask_fn(q_index[:, None], k_index[None, :]) &
              (k_index < length)[None, :])[:, None, None, :]
      if form == "kernel":
        normaliser, values = carry
        weights = jnp.exp(scores) * mask
        return (normaliser + weights.sum(-1),
                values + jnp.einsum("qhgk,khd->qhgd", weights, v_block)), None
      high, normaliser, values = carry
      scores = jnp.where(mask, scores, -jnp.inf)
      new_high = jnp.maximum(high, scores.max(-1))
      shift = jnp.where(jnp.isfinite(new_high), new_high, 0.0)
      rescale = jnp.where(jnp.isfinite(high), jnp.exp(high - shift), 0.0)
      weights = jnp.exp(scores - shift[..., None])
      return (new_high, rescale * normaliser + weights.sum(-1),
              rescale[..., None] * values +
              jnp.einsum("qhgk,khd->qhgd", weights, v_block)), None
    init = (jnp.zeros((block, kv_heads, group)),
            jnp.zeros((block, kv_heads, group, d)))
    if form == "online":
      init = (jnp.full((block, kv_heads, group), -jnp.inf),) + init
    if window_blocks is not None:
      left, count = window_blocks
      start = jnp.maximum(0, (q_index[0] - left) // block)
      sliced = [lax.dynamic_slice_in_dim(a, start, count, axis=0)
                for a in (index, k_blocks, v_blocks)]
      carry, _ = lax.scan(key_block, init, tuple(sliced))
    elif skip is None:
      carry, _ = lax.scan(key_block, init, (index, k_blocks, v_blocks))
    else:
      carry = lax.fori_loop(
          0, jnp.minimum(skip(q_index[-1]), n),
          lambda i, c: key_block(c, (index[i], k_blocks[i], v_blocks[i]))[0],
          init)
    normaliser, values = carry[-2:]
    return values / jnp.where(normaliser > 0, normaliser, 1.0)[..., None]
  out = lax.map(query_block, (index, q_blocks))
  return out.reshape(n * block, heads, d)[:length]


def plain_attention(q, k, v, mask_fn):
  k, v = (jnp.repeat(a, H // KV, axis=1) for a in (k, v))
  logits = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(D)
  i = jnp.arange(q.shape[0])
  logits = jnp.where(mask_fn(i[:, None], i[None, :]), logits, -1e9)
  return jnp.einsum("hts,shd->thd", jax.nn.softmax(logits, -1), v)


def layer(attention):
  def fun(x):   # x: [T, MODEL]
    q = (x @ W[0]).reshape(-1, H, D)
    k = (x @ W[1][:, :KV * D]).reshape(-1, KV, D)
    v = (x @ W[2][:, :KV * D]).reshape(-1, KV, D)
    return x + attention(q, k, v).reshape(-1, H * D) @ W[0].T
  return fun


XS = jax.random.normal(jax.random.key(0), (L, MODEL))


# each form with and without a window, at a block that divides L and one
# that does not (padding)
@pytest.mark.parametrize("form,block,mask_fn", [
    ("kernel", 4, causal), ("kernel", 5, window(3)),
    ("online", 5, causal), ("online", 4, window(3))],
    ids=["kernel-4-causal", "kernel-5-window", "online-5-causal",
         "online-4-window"])
def test_blockwise_attention_converts(form, block, mask_fn):
  fun = layer(lambda q, k, v: blockwise_attention(q, k, v, block, mask_fn,
                                                  form))
  reference = layer(lambda q, k, v: plain_attention(q, k, v, mask_fn))
  np.testing.assert_allclose(fun(XS), reference(XS), rtol=1e-5, atol=1e-5)
  check_scan(fun, XS, prefill_lengths=[1, 6, L])


@pytest.mark.parametrize("form", ["kernel", "online"])
def test_carry_is_the_plain_kv_cache_at_kv_heads(form):
  """The keys and values are buffered once each, at the key/value head
  count, over the (padded) sequence: not per block, not per query head."""
  fun = layer(lambda q, k, v: blockwise_attention(q, k, v, 4, causal, form))
  pair = scanagram.to_step(fun, XS)
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(pair.carry_spec()))
  assert shapes == [(), (KV, L, D), (KV, L, D)], shapes
  plain = scanagram.to_step(
      layer(lambda q, k, v: plain_attention(q, k, v, causal)), XS)
  assert sum(a.size for a in jax.tree.leaves(pair.carry_spec())) == sum(
      a.size for a in jax.tree.leaves(plain.carry_spec()))


def test_anti_causal_blockwise_attention_is_refused():
  """A mask keeping the later keys (q <= k) is refused over whole axes,
  naming the user's line and the block-wise code as written."""
  fun = layer(lambda q, k, v: blockwise_attention(
      q, k, v, 4, lambda i, j: i <= j))
  message = check_refused(fun, XS, "computes in blocks")
  assert "as written" in message


def test_untile_keeps_values():
  """The rewrite is an identity of the values: the untiled jaxpr computes
  what the block-wise one does."""
  from scanagram import untile
  fun = layer(lambda q, k, v: blockwise_attention(q, k, v, 5, window(3)))
  closed = jax.make_jaxpr(fun)(XS)
  untiled, splits, _, _ = untile.untile(closed)
  assert untiled is not None and (3, 5) in splits   # L = 12 padded to 15
  assert not any(e.primitive.name == "scan" for e in untiled.jaxpr.eqns)
  got, = jax.extend.core.jaxpr_as_fun(untiled)(XS)
  np.testing.assert_allclose(got, fun(XS), rtol=1e-5, atol=1e-6)
  # nothing block-wise: nothing to rewrite
  assert untile.untile(jax.make_jaxpr(layer(
      lambda q, k, v: plain_attention(q, k, v, causal)))(XS))[0] is None


def test_window_of_online_softmax_gets_a_ring():
  """A window proven by the mask of the online form (-inf outside it) keeps
  a ring of the last w keys and values, as plain attention does."""
  fun = layer(lambda q, k, v: blockwise_attention(q, k, v, 4, window(3),
                                                  "online"))
  pair = scanagram.to_step(fun, XS)
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(pair.carry_spec()))
  assert shapes == [(), (KV, 3, D), (KV, 3, D)], shapes


def test_running_sum_not_rescaled_by_its_maximum_is_refused():
  """A running sum that ignores the running maximum (``g = exp(s)`` with
  ``a = exp(m - m')``) is not an online softmax: its scan is not rewritten,
  and the conversion refuses."""
  def attention(q, k, v):
    q_blocks, k_blocks = q.reshape(3, 4, H, D), k.reshape(3, 4, KV, D)
    k_blocks = jnp.repeat(k_blocks, G, axis=2)
    index = jnp.arange(L).reshape(3, 4)

    def query_block(args):
      q_index, q_block = args

      def key_block(carry, blocks):
        high, normaliser = carry
        k_index, k_block = blocks
        scores = jnp.einsum("qhd,khd->qhk", q_block, k_block)
        scores = jnp.where((q_index[:, None] >= k_index[None, :])[:, None],
                           scores, -jnp.inf)
        new_high = jnp.maximum(high, scores.max(-1))
        rescale = jnp.exp(high - new_high)
        return (new_high, rescale * normaliser + jnp.exp(scores).sum(-1)), None
      (_, normaliser), _ = lax.scan(
          key_block, (jnp.full((4, H), -1e30), jnp.zeros((4, H))),
          (index, k_blocks))
      return normaliser
    return lax.map(query_block, (index, q_blocks)).reshape(L, H)

  def fun(x):
    q = (x @ W[0]).reshape(-1, H, D)
    k = (x @ W[1][:, :KV * D]).reshape(-1, KV, D)
    return attention(q, k, None)
  check_refused(fun, XS, "computes in blocks")


def _dot_shapes(jaxpr):
  for e in jaxpr.eqns:
    if e.primitive.name == "dot_general":
      yield e.outvars[0].aval.shape
    for p in e.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _dot_shapes(getattr(inner, "jaxpr", inner))


@pytest.mark.parametrize("form", ["kernel", "online"])
def test_prefill_keeps_the_query_blocks(form):
  """A prefill of the whole prompt runs in the training mode's blocks of 4
  queries: no product in it holds L x L scores (a plain prefill does)."""
  fun = layer(lambda q, k, v: blockwise_attention(q, k, v, 4, causal, form))
  pair = scanagram.to_step(fun, XS)
  shapes = list(_dot_shapes(jax.make_jaxpr(pair.prefill)(XS).jaxpr))
  assert shapes and not any(s.count(L) >= 2 for s in shapes), shapes
  plain = scanagram.to_step(
      layer(lambda q, k, v: plain_attention(q, k, v, causal)), XS)
  assert any(s.count(L) >= 2 for s in _dot_shapes(
      jax.make_jaxpr(plain.prefill)(XS).jaxpr))
  _, ys = pair.prefill(XS)
  np.testing.assert_allclose(ys, fun(XS), rtol=1e-5, atol=1e-5)


def diagonal(block):
  """The key blocks up to the one holding the block's last query."""
  return lambda last: last // block + 1


@pytest.mark.parametrize("form,block", [("kernel", 4), ("online", 5)])
def test_causal_block_skipping_converts(form, block):
  """A fori_loop over the key blocks up to the diagonal (the blocks after
  it hold only future keys) converts to the plain KV-cache step."""
  fun = layer(lambda q, k, v: blockwise_attention(
      q, k, v, block, causal, form, skip=diagonal(block)))
  reference = layer(lambda q, k, v: plain_attention(q, k, v, causal))
  np.testing.assert_allclose(fun(XS), reference(XS), rtol=1e-5, atol=1e-5)
  check_scan(fun, XS, prefill_lengths=[1, 7])


def test_skipping_a_block_of_past_keys_is_refused():
  """A loop that stops before the diagonal block drops past keys: over
  whole axes they would count, so the rewrite is refused."""
  fun = layer(lambda q, k, v: blockwise_attention(
      q, k, v, 4, causal, "online", skip=lambda last: last // 4))
  check_refused(fun, XS, "computes in blocks",
                "query block 0 visits no key block")


@pytest.mark.parametrize("form", ["kernel", "online"])
def test_window_block_skipping_converts(form):
  """Key blocks sliced around each query block's window (a dynamic_slice
  from the block's first query) convert when the mask proves the window:
  the blocks skipped before it hold only keys it masks. The carry is a
  ring of the window."""
  fun = layer(lambda q, k, v: blockwise_attention(
      q, k, v, 4, window(3), form, window_blocks=(3, 2)))
  reference = layer(lambda q, k, v: plain_attention(q, k, v, window(3)))
  np.testing.assert_allclose(fun(XS), reference(XS), rtol=1e-5, atol=1e-5)
  check_scan(fun, XS, prefill_lengths=[1, 7])
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(
      scanagram.to_step(fun, XS).carry_spec()))
  assert shapes == [(), (KV, 3, D), (KV, 3, D)], shapes


def test_window_skipping_past_keys_the_mask_keeps_is_refused():
  """Slicing key blocks around a window while the mask is only causal
  drops past keys the mask keeps: refused, saying so."""
  fun = layer(lambda q, k, v: blockwise_attention(
      q, k, v, 4, causal, "online", window_blocks=(3, 2)))
  check_refused(fun, XS, "computes in blocks", "skips key blocks",
                "which its masks do not remove")
