"""Refusals of common non-converting patterns say what to write instead, and
what they advise converts."""
import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from adapters import haiku as hk_adapter
from conftest import check_scan, random_like

T, D = 6, 4
XS = random_like(jnp.zeros((T, D)))
W = jax.random.normal(jax.random.key(1), (3, D, D)) / 2
IDS = jnp.array([1, 2, 3, 0, 0, 0])  # 0 pads
EMBED = jax.random.normal(jax.random.key(2), (4, D))
TRIL = jnp.tril(jnp.ones((T, T), bool))

LOOP = "write it as `lax.scan` over the sequence (`hk.dynamic_unroll` in Haiku)"
LENGTHS = ("give each row's length instead (`to_step(..., batch_axes=...)`, "
           "then `prefill(..., lengths=...)`)")
RUNNING = "A causal alternative: a running maximum or minimum (`lax.cummax`"


def refused(primitive, *parts):
  """pytest.raises for a refusal of ``primitive`` at a line of this file
  whose message goes on with ``parts`` in order."""
  rest = ".*".join(re.escape(p) for p in parts)
  return pytest.raises(scanagram.ScanConversionError,
                       match=rf"`{primitive}` at \S*test_advice\.py:\d+.*{rest}")


def rnn_cell(h, x):
  return jnp.tanh(x @ W[0] + h @ W[1])


# -- loops over time -> lax.scan ------------------------------------------------
def test_python_loop_indexing_time():
  def f(x):
    h, outs = jnp.zeros(D), []
    for t in range(x.shape[0]):
      h = rnn_cell(h, x[t])
      outs.append(h)
    return jnp.stack(outs)
  with refused("squeeze", "squeezes away the scanned axis", LOOP):
    scanagram.to_step(f, XS)


def test_python_loop_slicing_time():
  def f(x):
    h, outs = jnp.zeros((1, D)), []
    for t in range(x.shape[0]):
      h = rnn_cell(h, x[t:t + 1])
      outs.append(h)
    return jnp.concatenate(outs)
  with refused("slice", "a future element", LOOP):
    scanagram.to_step(f, XS)


def test_fori_loop_over_time():
  def f(x):
    def body(t, carry):
      h, out = carry
      h = rnn_cell(h, x[t])
      return h, out.at[t].set(h)
    return lax.fori_loop(0, x.shape[0], body, (jnp.zeros(D), 0 * x))[1]
  with refused("dynamic_slice", "window of 1 of the 6 elements", LOOP):
    scanagram.to_step(f, XS)


def test_haiku_static_unroll():
  def model(x):
    core = hk.LSTM(8)
    return hk.static_unroll(core, x, core.initial_state(None))[0]
  with refused("unstack", "`hk.static_unroll` does",
               "Write the loop as `lax.scan`", "`hk.dynamic_unroll`"):
    # without params= the pair converts when first used
    hk_adapter.to_step(hk.transform(model), XS).carry_spec()


def test_a_slice_that_is_no_loop_gets_no_loop_advice():
  for f in (lambda x: x[1:], lambda x: x * x[-1]):
    with pytest.raises(scanagram.ScanConversionError) as info:
      scanagram.to_step(f, XS)
    assert "future element" in str(info.value)
    assert "lax.scan" not in str(info.value)


def test_the_loop_as_lax_scan_converts():
  def f(x):
    return lax.scan(lambda h, xt: (rnn_cell(h, xt),) * 2, jnp.zeros(D), x)[1]
  check_scan(f, XS, prefill_lengths=(0, 3))


# -- padding masks from the data -> lengths ---------------------------------------
def qkv(x):
  return x @ W[0], x @ W[1], x @ W[2]


def attend(x, mask=None, bias=0.0):
  q, k, v = qkv(x)
  scores = jnp.einsum("...td,...sd->...ts", q, k) + bias
  if mask is not None:
    scores = jnp.where(mask, scores, -1e9)
  return jax.nn.softmax(scores, axis=-1) @ v


def test_key_padding_mask_from_the_data():
  def f(ids):
    return attend(EMBED[ids], TRIL & (ids != 0)[None, :])
  with refused("select_n", "a sequence scanned along another axis",
               "key-padding mask or bias computed from the data", LENGTHS):
    scanagram.to_step(f, IDS)


def test_additive_key_padding_bias_from_the_data():
  def f(ids):
    bias = jnp.where(TRIL & (ids != 0)[None, :], 0.0, -1e9)
    return attend(EMBED[ids], bias=bias)
  with refused("add", "a sequence scanned along another axis", LENGTHS):
    scanagram.to_step(f, IDS)


def test_query_padding_mask_from_the_data():
  def f(ids):
    return attend(EMBED[ids], TRIL & (ids != 0)[:, None])
  with refused("select_n", "its mask depends on the scanned input",
               "padding mask computed from the data", LENGTHS):
    scanagram.to_step(f, IDS)


def test_mask_from_an_unscanned_argument():
  def f(x, valid):
    return attend(x, TRIL & valid[None, :])
  with refused("select_n", "depends on an input of the function",
               "Build the causal mask inside the function", LENGTHS):
    scanagram.to_step(f, XS, jnp.ones(T, bool), in_axes=(0, None))


def test_lengths_instead_of_a_padding_mask():
  """Each row with its length gives that row's attention alone: what the
  key-padding mask gave on right-padded rows."""
  batch = random_like(jnp.zeros((2, T, D)))
  causal = lambda x: attend(x, TRIL[:x.shape[-2], :x.shape[-2]])
  fns = scanagram.to_step(causal, batch, in_axes=1, out_axes=1,
                          batch_axes=0, out_batch_axes=0)
  _, out = fns.prefill(batch, lengths=[T, 3])
  np.testing.assert_allclose(out[1, :3], causal(batch[1, :3]), atol=1e-5)
  np.testing.assert_allclose(out[0], causal(batch[0]), atol=1e-5)


# -- sorting and top-k over time -> running values ------------------------------
@pytest.mark.parametrize("primitive, f", [
    ("top_k", lambda x: lax.top_k(x.T, 3)[0]),
    ("sort", lambda x: jnp.sort(x, axis=0)),
    ("sort", lambda x: jnp.argsort(x, axis=0)),
    ("approx_top_k", lambda x: lax.approx_max_k(x.T, 3)[0]),
], ids=["top_k", "sort", "argsort", "approx_max_k"])
def test_selection_over_time(primitive, f):
  with refused(primitive, "along the scanned axis",
               "every position of the sequence, later ones included", RUNNING):
    scanagram.to_step(f, XS)


def test_running_selections_convert():
  def running_top2(x):
    def step(best, xt):   # best: the 2 largest so far per feature, [2, D]
      best = lax.top_k(jnp.concatenate([best, xt[None]]).T, 2)[0].T
      return best, best
    return lax.scan(step, jnp.full((2, D), -jnp.inf), x)[1]
  check_scan(lambda x: lax.cummax(x, axis=0), XS, prefill_lengths=(0, 3))
  check_scan(running_top2, XS, prefill_lengths=(0, 3))
