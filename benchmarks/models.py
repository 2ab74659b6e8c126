"""The training-mode Haiku models the benchmarks convert.

Each is written once, batch-major (``xs: [B, T, ...]``, time axis 1), the
way a Haiku user writes it for training. :mod:`benchmarks.baselines` writes
the same math again by hand as a step, reading the parameters these models
create, so that both sides run the same parameters.
"""
import haiku as hk
import jax
import jax.numpy as jnp


# -- LSTM ----------------------------------------------------------------------
def lstm(hidden: int) -> hk.Transformed:
  """xs: [B, T, D] -> ys: [B, T, hidden], one ``hk.LSTM`` unrolled with
  ``hk.dynamic_unroll`` (batch-major) from a zero state."""
  def forward(xs):
    core = hk.LSTM(hidden)
    state = core.initial_state(xs.shape[0])
    ys, _ = hk.dynamic_unroll(core, xs, state, time_major=False)
    return ys
  return hk.transform(forward)


# -- WaveNet -------------------------------------------------------------------
def wavenet_dilations(layers: int):
  return [2 ** i for i in range(layers)]


def wavenet(channels: int, layers: int, out_dim: int) -> hk.Transformed:
  """xs: [B, T, D] -> ys: [B, T, out_dim]: a stack of dilated causal
  convolutions (kernel 2, dilation 1, 2, 4, ...), gated activations,
  residual and skip connections, as in WaveNet."""
  def forward(xs):
    h = hk.Linear(channels, name="embed")(xs)
    skip = 0.
    for i, rate in enumerate(wavenet_dilations(layers)):
      z = hk.Conv1D(2 * channels, 2, rate=rate, padding=hk.pad.causal,
                    name=f"dilated_{i}")(h)
      g = jnp.tanh(z[..., :channels]) * jax.nn.sigmoid(z[..., channels:])
      h = h + hk.Linear(channels, name=f"residual_{i}")(g)
      skip = skip + hk.Linear(channels, name=f"skip_{i}")(g)
    return hk.Linear(out_dim, name="out")(jax.nn.relu(skip))
  return hk.transform(forward)


# -- Linear recurrent units ----------------------------------------------------
def linear_step(left, right):
  """Composes two steps of ``h -> a * h + b`` given as ``(a, b)`` pairs."""
  return left[0] * right[0], right[0] * left[1] + right[1]


def lru(width: int, state: int, layers: int, out_dim: int) -> hk.Transformed:
  """xs: [B, T, D] -> ys: [B, T, out_dim]: residual blocks of a diagonal
  linear recurrence ``s_t = a * s_{t-1} + W x_t`` (a learned decay per
  state unit), trained with a parallel scan
  (``scanagram.associative_scan``), as LRU / S5-style models are."""
  import scanagram

  def forward(xs):
    h = hk.Linear(width, name="embed")(xs)
    for i in range(layers):
      nu = hk.get_parameter(f"nu_{i}", [state],
                            init=hk.initializers.RandomUniform(0.5, 3.0))
      decay = jnp.broadcast_to(jax.nn.sigmoid(nu), h.shape[:2] + (state,))
      drive = hk.Linear(state, name=f"in_{i}")(h)
      s = scanagram.associative_scan(linear_step, (decay, drive), axis=1)[1]
      h = h + hk.Linear(width, name=f"mix_{i}")(jax.nn.gelu(s))
    return hk.Linear(out_dim, name="head")(h)
  return hk.transform(forward)


# -- Transformer ---------------------------------------------------------------
def _decoder(d_model, layers, length, vocab, attend, mask_dims):
  """The GPT-style decoder both transformers share: token and learned
  position embeddings, pre-LayerNorm blocks of ``attend(i, a, mask)`` under
  a causal mask (with ``mask_dims`` leading axes of 1) and a GELU MLP."""
  def forward(tokens):
    t = tokens.shape[1]
    h = hk.Embed(vocab, d_model, name="embed")(tokens)
    positions = hk.get_parameter("positions", [length, d_model],
                                 init=hk.initializers.TruncatedNormal(0.02))
    h = h + positions[jnp.arange(t)]
    mask = jnp.tril(jnp.ones((1,) * mask_dims + (t, t), bool))
    for i in range(layers):
      a = hk.LayerNorm(-1, True, True, name=f"ln_attn_{i}")(h)
      h = h + attend(i, a, mask)
      m = hk.LayerNorm(-1, True, True, name=f"ln_mlp_{i}")(h)
      h = h + hk.nets.MLP([4 * d_model, d_model], activation=jax.nn.gelu,
                          name=f"mlp_{i}")(m)
    h = hk.LayerNorm(-1, True, True, name="ln_out")(h)
    return hk.Linear(vocab, name="unembed")(h)
  return hk.transform(forward)


def transformer(d_model: int, heads: int, layers: int, length: int,
                vocab: int) -> hk.Transformed:
  """tokens: [B, T] (T <= length) -> logits [B, T, vocab]: a GPT-style
  decoder (token and learned position embeddings, pre-LayerNorm blocks of
  ``hk.MultiHeadAttention`` under a causal mask and a GELU MLP)."""
  def attend(i, a, mask):
    return hk.MultiHeadAttention(
        heads, d_model // heads, w_init=hk.initializers.VarianceScaling(1.0),
        name=f"attn_{i}")(a, a, a, mask=mask)
  return _decoder(d_model, layers, length, vocab, attend, mask_dims=2)


# -- Grouped-query attention ---------------------------------------------------
def gqa_transformer(d_model: int, heads: int, kv_heads: int, layers: int,
                    length: int, vocab: int) -> hk.Transformed:
  """tokens: [B, T] -> logits [B, T, vocab]: the decoder of
  :func:`transformer` with grouped-query attention written as Llama-style
  code does: ``heads`` query heads over ``kv_heads`` key/value heads, the
  keys and values repeated with ``jnp.repeat`` before both products."""
  dh = d_model // heads
  group = heads // kv_heads

  def attention(x, mask, name):
    b, t, _ = x.shape
    linear = lambda n, out: hk.Linear(out, name=f"{name}_{n}")  # noqa: E731
    q = linear("query", heads * dh)(x).reshape(b, t, heads, dh)
    k = linear("key", kv_heads * dh)(x).reshape(b, t, kv_heads, dh)
    v = linear("value", kv_heads * dh)(x).reshape(b, t, kv_heads, dh)
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(dh).astype(
        x.dtype)
    logits = jnp.where(mask, logits, -1e30)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), v)
    return linear("out", d_model)(out.reshape(b, t, heads * dh))

  return _decoder(d_model, layers, length, vocab,
                  lambda i, a, mask: attention(a, mask, f"attn_{i}"),
                  mask_dims=0)
