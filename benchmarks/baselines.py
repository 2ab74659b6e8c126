"""Hand-written steps, written as an expert would, independently of scanagram.

Each baseline runs the same math as its model in :mod:`benchmarks.models`
and reads that model's Haiku parameters (the dict ``model.init`` returns),
so the benchmark compares two implementations of one function:

* :func:`lstm_step`: ``hk.LSTM`` called directly on one element.
* :class:`WaveNetQueues`: Fast WaveNet (Paine et al., 2016): one queue per
  dilated convolution holding its last ``rate`` inputs, read and written at
  ``t % rate`` in place.
* :class:`LRUStep`: the linear recurrence ``s = a * s + W x`` per layer.
* :class:`TransformerCache`: a KV-cache decoder step, one key cache and one
  value cache per layer (``[B, H, L, dh]``), written with
  ``lax.dynamic_update_slice`` at the current position; the step and the
  generation loop donate the carry so XLA updates the caches in place.

Every class has ``init(params) -> carry`` and ``step(params, carry, x) ->
(carry, y)`` (pure, to wrap in ``jax.jit(..., donate_argnums=1)`` or in a
``lax.scan``).
"""
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import models


def donated(step):
  """``jax.jit(step, donate_argnums=1)``: the carry is updated in place."""
  return jax.jit(step, donate_argnums=1)


def scan_steps(step, axis=1):
  """Jitted ``run(params, carry, xs) -> (carry, ys)``: ``step`` over ``xs``
  (time along ``axis``) in one ``lax.scan``, the carry donated."""
  def run(params, carry, xs):
    xs = jax.tree.map(lambda x: jnp.moveaxis(x, axis, 0), xs)
    carry, ys = lax.scan(lambda c, x: step(params, c, x), carry, xs)
    return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, axis), ys)
  return jax.jit(run, donate_argnums=1)


# -- LSTM ----------------------------------------------------------------------
class LSTMStep:
  """``hk.LSTM(hidden)`` applied to one element ``x: [B, D]``; the carry is
  the ``hk.LSTMState`` (named ``lstm`` as in :func:`models.lstm`, so it reads
  the model's parameters unchanged)."""

  def __init__(self, hidden, batch):
    self.hidden, self.batch = hidden, batch

    def core(x, state):
      return hk.LSTM(hidden)(x, state)
    self._core = hk.without_apply_rng(hk.transform(core))

  def init(self, params):
    del params
    shape = (self.batch, self.hidden)
    return hk.LSTMState(hidden=jnp.zeros(shape), cell=jnp.zeros(shape))

  def step(self, params, carry, x):
    y, carry = self._core.apply(params, x, carry)
    return carry, y


# -- WaveNet -------------------------------------------------------------------
class WaveNetQueues:
  """Fast-WaveNet generation for :func:`models.wavenet`.

  A kernel-2 causal convolution with dilation r needs, at time t, its input
  at t - r. Layer i keeps a queue ``[B, r_i, C]`` of its last r_i inputs:
  slot ``t % r_i`` holds the input from t - r_i; the step reads it and
  writes the current input there (``dynamic_update_slice``; in place when
  the carry is donated). Carry: ``{"queues": [per layer], "t": int32}``.
  """

  def __init__(self, channels, layers, batch):
    self.channels, self.batch = channels, batch
    self.rates = models.wavenet_dilations(layers)

  def init(self, params):
    del params
    return {"queues": [jnp.zeros((self.batch, r, self.channels), jnp.float32)
                       for r in self.rates],
            "t": jnp.zeros((), jnp.int32)}

  def step(self, params, carry, x):
    c = self.channels
    t = carry["t"]

    def linear(name, v):
      return v @ params[name]["w"] + params[name]["b"]

    h = linear("embed", x)
    skip = 0.
    queues = []
    for i, (rate, queue) in enumerate(zip(self.rates, carry["queues"])):
      slot = t % rate
      past = lax.dynamic_index_in_dim(queue, slot, 1, keepdims=False)
      queues.append(lax.dynamic_update_index_in_dim(queue, h, slot, 1))
      w, b = params[f"dilated_{i}"]["w"], params[f"dilated_{i}"]["b"]
      # the kernel-2 convolution as one matmul: [x_{t-r}, x_t] @ [w0; w1]
      z = jnp.concatenate([past, h], -1) @ w.reshape(2 * c, 2 * c) + b
      g = jnp.tanh(z[..., :c]) * jax.nn.sigmoid(z[..., c:])
      h = h + linear(f"residual_{i}", g)
      skip = skip + linear(f"skip_{i}", g)
    y = linear("out", jax.nn.relu(skip))
    return {"queues": queues, "t": t + 1}, y


# -- Linear recurrent units ----------------------------------------------------
class LRUStep:
  """The recurrence of :func:`models.lru` one element at a time: per layer
  ``s = a * s + W x`` with the state ``[B, state]`` in the carry."""

  def __init__(self, state, layers, batch):
    self.state, self.layers, self.batch = state, layers, batch

  def init(self, params):
    del params
    return [jnp.zeros((self.batch, self.state), jnp.float32)
            for _ in range(self.layers)]

  def step(self, params, carry, x):
    def linear(name, v):
      return v @ params[name]["w"] + params[name]["b"]

    h = linear("embed", x)
    states = []
    for i, s in enumerate(carry):
      decay = jax.nn.sigmoid(params["~"][f"nu_{i}"])
      s = decay * s + linear(f"in_{i}", h)
      states.append(s)
      h = h + linear(f"mix_{i}", jax.nn.gelu(s))
    return states, linear("head", h)


# -- Transformer ---------------------------------------------------------------
def _layer_norm(params, x, eps=1e-5):
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.var(x, -1, keepdims=True)
  return params["scale"] * lax.rsqrt(var + eps) * (x - mean) + params["offset"]


def _linear(params, name, v):
  return v @ params[name]["w"] + params[name]["b"]


def _embed_at(params, x, t):
  """Token ``x: [B]`` embedded at position ``t``: ``[B, D]``."""
  return params["embed"]["embeddings"][x] + lax.dynamic_index_in_dim(
      params["~"]["positions"], t, 0, keepdims=False)


def _mlp(params, i, h):
  """Block ``i``'s pre-LayerNorm GELU MLP (``hk.nets.MLP``'s names)."""
  m = _layer_norm(params[f"ln_mlp_{i}"], h)
  m = jax.nn.gelu(_linear(params, f"mlp_{i}/~/linear_0", m))
  return _linear(params, f"mlp_{i}/~/linear_1", m)


class TransformerCache:
  """KV-cache decoding for :func:`models.transformer`.

  Carry: ``{"k": [per layer], "v": [per layer], "t": int32}``. A step embeds
  token ``x: [B]`` at position t, and in each layer projects q, k, v for
  that one position, writes k and v into the layer's caches at t
  (``dynamic_update_slice``), attends over the cache with positions > t
  masked out, and returns the logits ``[B, vocab]``.

  Args:
    head_major: the cache layout. True (the default, what an expert writes):
      ``[B, H, L, dh]``, so that both attention products read the cache in
      place (batch dims B, H leading, contraction or free dim dh minor).
      False: ``[B, L, H, dh]``, the layout of Haiku's projections
      (``hk.MultiHeadAttention`` reshapes to ``[..., T, H, dh]``); XLA then
      transposes the whole cache for each product, every step (kept as a
      diagnostic: it is the layout the derived step keeps today).
  """

  def __init__(self, d_model, heads, layers, length, batch, head_major=True):
    self.d, self.heads, self.layers = d_model, heads, layers
    self.length, self.batch = length, batch
    self.dh = d_model // heads
    self.head_major = head_major

  def cache_shape(self):
    if self.head_major:
      return (self.batch, self.heads, self.length, self.dh)
    return (self.batch, self.length, self.heads, self.dh)

  def init(self, params):
    del params
    zeros = lambda: jnp.zeros(self.cache_shape(), jnp.float32)  # noqa: E731
    return {"k": [zeros() for _ in range(self.layers)],
            "v": [zeros() for _ in range(self.layers)],
            "t": jnp.zeros((), jnp.int32)}

  def step(self, params, carry, x):
    t = carry["t"]
    b, hh, dh = self.batch, self.heads, self.dh
    if self.head_major:
      one, at, cache = (b, hh, 1, dh), (0, 0, t, 0), "bhTd"
    else:
      one, at, cache = (b, 1, hh, dh), (0, t, 0, 0), "bThd"

    linear = functools.partial(_linear, params)
    h = _embed_at(params, x, t)                                  # [B, D]
    visible = jnp.arange(self.length) <= t                       # [L]
    ks, vs = [], []
    for i in range(self.layers):
      a = _layer_norm(params[f"ln_attn_{i}"], h)
      q = linear(f"attn_{i}/query", a).reshape(b, hh, dh)
      k = linear(f"attn_{i}/key", a).reshape(one)
      v = linear(f"attn_{i}/value", a).reshape(one)
      k_cache = lax.dynamic_update_slice(carry["k"][i], k, at)
      v_cache = lax.dynamic_update_slice(carry["v"][i], v, at)
      ks.append(k_cache)
      vs.append(v_cache)
      logits = jnp.einsum(f"bhd,{cache}->bhT", q, k_cache) / np.float32(
          np.sqrt(dh))
      logits = jnp.where(visible, logits, -1e30)
      weights = jax.nn.softmax(logits)
      attn = jnp.einsum(f"bhT,{cache}->bhd", weights, v_cache).reshape(b, -1)
      h = h + linear(f"attn_{i}/linear", attn)
      h = h + _mlp(params, i, h)
    logits = linear("unembed", _layer_norm(params["ln_out"], h))
    return {"k": ks, "v": vs, "t": t + 1}, logits

  def generate(self, params, prompt, steps):
    """Greedy generation in one compiled loop: prefill by stepping through
    ``prompt: [B, P]`` (a ``lax.scan``), then ``steps`` tokens: the first
    is the argmax of the prompt's last logits, each next one the argmax of
    the step on the previous one (``steps - 1`` steps in one ``lax.scan``).
    Returns ``[B, steps]`` tokens. (Jit it with ``steps`` static.)"""
    carry = self.init(params)
    carry, logits = lax.scan(lambda c, x: self.step(params, c, x), carry,
                             prompt.T)
    first = jnp.argmax(logits[-1], -1).astype(prompt.dtype)

    def body(state, _):
      carry, token = state
      carry, logits = self.step(params, carry, token)
      token = jnp.argmax(logits, -1).astype(token.dtype)
      return (carry, token), token
    _, rest = lax.scan(body, (carry, first), None, length=steps - 1)
    tokens = jnp.concatenate([first[None], rest], 0)
    return tokens.T


class GQACache:
  """KV-cache decoding for :func:`models.gqa_transformer`, as an expert
  writes it: caches ``[B, KV, L, dh]`` at the key/value head count, the
  queries grouped ``[B, KV, G, dh]`` and both products grouped einsums.
  Carry: ``{"k": [per layer], "v": [per layer], "t": int32}``."""

  def __init__(self, d_model, heads, kv_heads, layers, length, batch):
    self.d, self.heads, self.kv, self.layers = d_model, heads, kv_heads, layers
    self.length, self.batch = length, batch
    self.dh = d_model // heads

  def init(self, params):
    del params
    shape = (self.batch, self.kv, self.length, self.dh)
    return {"k": [jnp.zeros(shape) for _ in range(self.layers)],
            "v": [jnp.zeros(shape) for _ in range(self.layers)],
            "t": jnp.zeros((), jnp.int32)}

  def step(self, params, carry, x):
    t = carry["t"]
    b, kv, dh = self.batch, self.kv, self.dh
    g = self.heads // kv

    linear = functools.partial(_linear, params)
    h = _embed_at(params, x, t)                                  # [B, D]
    visible = jnp.arange(self.length) <= t                       # [L]
    ks, vs = [], []
    for i in range(self.layers):
      a = _layer_norm(params[f"ln_attn_{i}"], h)
      q = linear(f"attn_{i}_query", a).reshape(b, kv, g, dh)
      k = linear(f"attn_{i}_key", a).reshape(b, kv, 1, dh)
      v = linear(f"attn_{i}_value", a).reshape(b, kv, 1, dh)
      k_cache = lax.dynamic_update_slice(carry["k"][i], k, (0, 0, t, 0))
      v_cache = lax.dynamic_update_slice(carry["v"][i], v, (0, 0, t, 0))
      ks.append(k_cache)
      vs.append(v_cache)
      logits = jnp.einsum("bkgd,bkTd->bkgT", q, k_cache) / np.float32(
          np.sqrt(dh))
      logits = jnp.where(visible, logits, -1e30)
      attn = jnp.einsum("bkgT,bkTd->bkgd", jax.nn.softmax(logits), v_cache)
      h = h + linear(f"attn_{i}_out", attn.reshape(b, -1))
      h = h + _mlp(params, i, h)
    logits = linear("unembed", _layer_norm(params["ln_out"], h))
    return {"k": ks, "v": vs, "t": t + 1}, logits


def carry_bytes(carry):
  """Bytes in a carry (a pytree of arrays or ShapeDtypeStructs)."""
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(carry)))
