"""A Llama-style Flax NNX model trained on the Python standard library's
source, served through the derived step of its training mode.

The model is written as Flax NNX users write one: nnx.Embed, blocks of
nnx.RMSNorm, rotary grouped-query attention (4 query heads over 2 key/value
heads; in training mode the keys and values are widened to the query heads
with jnp.repeat) and a SwiGLU MLP, a final nnx.RMSNorm and the embedding
matrix reused as the output layer (--tie-embeddings 0: an nnx.Linear head).

The attention module also has Flax's own decoding mode, written the way
nnx.MultiHeadAttention(decode=True) writes it (nnx.MultiHeadAttention cannot
express this model: it projects the queries and keys internally, leaving no
place for the rotary embedding): nnx.view(model, decode=True, batch_size=B,
max_length=L) gives a model whose attention layers keep nnx.Cache variables,
[B, L, Hkv, dh] keys and values and an index, updated with
lax.dynamic_update_slice, one token per call.

After training (optax, a few hundred steps) the script converts the
training-mode model with scanagram.adapters.nnx.to_step and:
  * serves a batch of prompts of different lengths (right-padded, lengths=)
    with top-p sampling, stopping each row at its first newline;
  * checks prefill + steps against model(tokens) (exits non-zero if they
    differ by more than 1e-4), and Flax's decode mode likewise;
  * times generation per token: pair.generate (one compiled loop), Flax's
    decode mode in a compiled loop (the prompt fed one token per call, as
    that mode takes it), and naive recomputation (the jitted training-mode
    model re-run on a right-padded length-L buffer for every token).

Run: python examples/flax_llama.py [--smoke] [--help]
"""
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax
from tqdm import tqdm

import common
from scanagram import sampling
from scanagram.adapters import nnx as nnx_adapter

PROMPTS = ["import ", "def ", "class Stack", "    for name in ",
           "        raise ValueError("]


def rope(x, positions, base=10_000.0):
  """Rotary position embedding of ``x`` ``[B, T, H, dh]`` at ``positions``
  (``[T]``), rotating the pairs (i, i + dh/2)."""
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs      # [T, dh/2]
  cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Attention(nnx.Module):
  """Rotary grouped-query self-attention, causal.

  Training mode (``decode=False``): ``[B, T, d] -> [B, T, d]``, positions
  0..T-1 under a causal mask. Decode mode, as ``nnx.MultiHeadAttention``'s:
  one token ``[B, 1, d]`` per call at position ``cache_index``, its key and
  value written into the cache, attending over positions <= cache_index.
  """

  def __init__(self, d_model, heads, kv_heads, *, decode=False, rngs):
    self.heads, self.kv_heads = heads, kv_heads
    self.head_dim = d_model // heads
    dense = functools.partial(nnx.LinearGeneral, use_bias=False, rngs=rngs)
    self.query = dense(d_model, (heads, self.head_dim))
    self.key = dense(d_model, (kv_heads, self.head_dim))
    self.value = dense(d_model, (kv_heads, self.head_dim))
    self.out = dense((heads, self.head_dim), d_model, axis=(-2, -1))
    self.decode = decode
    self.cached_key = nnx.data(None)
    self.cached_value = nnx.data(None)
    self.cache_index = nnx.data(None)

  def init_cache(self, batch_size, max_length, dtype=jnp.float32):
    shape = (batch_size, max_length, self.kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

  def set_view(self, decode=None, batch_size=None, max_length=None):
    """For ``nnx.view(model, decode=True, batch_size=B, max_length=L)``."""
    if decode is not None:
      self.decode = decode
      if decode:
        self.init_cache(batch_size, max_length)

  def __call__(self, x):
    q, k, v = self.query(x), self.key(x), self.value(x)   # [B, T, heads, dh]
    t = x.shape[1]
    if self.decode:
      index = self.cache_index[...]
      positions = index + jnp.arange(t)
      k = rope(k, positions)
      zero = jnp.zeros((), jnp.int32)
      k = lax.dynamic_update_slice(self.cached_key[...], k,
                                   (zero, index, zero, zero))
      v = lax.dynamic_update_slice(self.cached_value[...], v,
                                   (zero, index, zero, zero))
      self.cached_key[...] = k
      self.cached_value[...] = v
      self.cache_index[...] += t
      mask = jnp.arange(k.shape[1])[None, :] <= positions[:, None]
    else:
      positions = jnp.arange(t)
      k = rope(k, positions)
      mask = jnp.tril(jnp.ones((t, t), bool))
    q = rope(q, positions)
    group = self.heads // self.kv_heads
    k = jnp.repeat(k, group, axis=2)                  # [B, S, heads, dh]
    v = jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(self.head_dim)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    return self.out(jnp.einsum("bhts,bshd->bthd", weights, v))


class SwiGLU(nnx.Module):
  def __init__(self, d_model, hidden, *, rngs):
    dense = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
    self.gate = dense(d_model, hidden)
    self.up = dense(d_model, hidden)
    self.down = dense(hidden, d_model)

  def __call__(self, x):
    return self.down(nnx.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, d_model, heads, kv_heads, hidden, *, rngs):
    self.attention_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.attention = Attention(d_model, heads, kv_heads, rngs=rngs)
    self.mlp_norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.mlp = SwiGLU(d_model, hidden, rngs=rngs)

  def __call__(self, h):
    h = h + self.attention(self.attention_norm(h))
    return h + self.mlp(self.mlp_norm(h))


class Llama(nnx.Module):
  """Token ids ``[B, T]`` -> logits ``[B, T, vocab]``."""

  def __init__(self, vocab, d_model, heads, kv_heads, layers, *,
               tie_embeddings=True, rngs):
    hidden = -(-8 * d_model // 3 // 32) * 32     # ~8/3 d, a multiple of 32
    self.embed = nnx.Embed(vocab, d_model, rngs=rngs,
                           embedding_init=nnx.initializers.normal(0.02))
    self.blocks = nnx.List([Block(d_model, heads, kv_heads, hidden,
                                  rngs=rngs) for _ in range(layers)])
    self.norm = nnx.RMSNorm(d_model, rngs=rngs)
    self.head = (nnx.data(None) if tie_embeddings else
                 nnx.Linear(d_model, vocab, use_bias=False, rngs=rngs))

  def __call__(self, tokens):
    h = self.embed(tokens)
    for block in self.blocks:
      h = block(h)
    h = self.norm(h)
    return self.embed.attend(h) if self.head is None else self.head(h)


def train(model, tokens, *, steps, batch, length, learning_rate, seed):
  """Adam(W) with warm-up and cosine decay; prints the loss ~10 times.
  Returns [(step, loss)]."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 10), steps, learning_rate / 10)
  optimizer = nnx.Optimizer(model, optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adamw(schedule, b2=0.99, weight_decay=0.01)), wrt=nnx.Param)

  @nnx.jit
  def update(model, optimizer, inputs, targets):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(
          model(inputs), targets).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  data = common.batches(tokens, batch, length, seed)
  losses, every = [], max(1, steps // 10)
  with tqdm(range(steps), desc="training", unit="step") as bar:
    for i in bar:
      loss = float(update(model, optimizer, *next(data)))
      if i % every == 0 or i == steps - 1:
        losses.append((i, loss))
        bar.set_postfix(loss=f"{loss:.3f}")
        tqdm.write(f"step {i:4d}  loss {loss:.3f} nats/char")
  return losses


def right_padded(prompts, pad=0):
  """``(tokens [B, P], lengths [B])``: the prompts, right-padded."""
  encoded = [common.encode(p) for p in prompts]
  lengths = np.array([len(e) for e in encoded], np.int32)
  tokens = np.full((len(prompts), lengths.max()), pad, np.int32)
  for row, e in zip(tokens, encoded):
    row[:len(e)] = e
  return jnp.asarray(tokens), jnp.asarray(lengths)


def completion(row, stops, pad):
  """Decoded tokens up to and including the first stop token."""
  row = [int(t) for t in np.asarray(row)]
  for i, t in enumerate(row):
    if t in stops:
      return common.decode(row[:i + 1])
  return common.decode([t for t in row if t != pad])


def decode_functions(decoder):
  """Flax's decode mode as jitted functions of ``(params, cache, ...)``:
  ``logits(params, cache, tokens [B, T]) -> [B, T, V]`` feeds the tokens
  one call at a time; ``generate(params, cache, prompt [B, P], steps,
  sample, rng) -> [B, steps]`` feeds the prompt, then samples, with the keys
  of ``pair.generate`` (``jax.random.split(rng, steps)``)."""
  graphdef, _, _ = nnx.split(decoder, nnx.Param, nnx.Cache)

  def call(params, cache, token):                     # token [B]
    model = nnx.merge(graphdef, params, cache)
    y = model(token[:, None])[:, 0]
    return nnx.state(model, nnx.Cache), y

  @jax.jit
  def logits(params, cache, tokens):
    _, ys = lax.scan(functools.partial(call, params), cache, tokens.T)
    return jnp.moveaxis(ys, 0, 1)

  @functools.partial(jax.jit, static_argnums=(3, 4))
  def generate(params, cache, prompt, steps, sample, rng):
    cache, _ = lax.scan(functools.partial(call, params), cache,
                        prompt[:, :-1].T)

    def body(state, key):
      cache, token = state
      cache, y = call(params, cache, token)
      token = sample(key, y)
      return (cache, token), token
    _, out = lax.scan(body, (cache, prompt[:, -1]),
                      jax.random.split(rng, steps))
    return out.T
  return logits, generate


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], d_model=128, heads=4, kv_heads=2, layers=4,
      length=128, batch=32, steps=300, learning_rate=3e-3,
      tie_embeddings=1, generate=80, top_p=0.9, temperature=0.8,
      timing_prompt=16, seed=0).parse_args(argv)
  if args.smoke:
    args.d_model, args.layers, args.length = 32, 2, 32
    args.batch, args.steps, args.generate, args.timing_prompt = 8, 20, 12, 8
  model = Llama(common.VOCAB, args.d_model, args.heads, args.kv_heads,
                args.layers, tie_embeddings=bool(args.tie_embeddings),
                rngs=nnx.Rngs(args.seed))
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"model: {args.layers} layers, d={args.d_model}, {args.heads} query "
        f"heads over {args.kv_heads} key/value heads, {params:,} parameters")
  tokens = common.python_corpus(200_000 if args.smoke else 2_000_000)
  print(f"corpus: {len(tokens):,} characters of the Python standard library")
  start = time.perf_counter()
  losses = train(model, tokens, steps=args.steps, batch=args.batch,
                 length=args.length, learning_rate=args.learning_rate,
                 seed=args.seed)
  print(f"loss: {losses[0][1]:.3f} -> {losses[-1][1]:.3f} nats/char in "
        f"{args.steps} steps ({time.perf_counter() - start:.0f} s)")

  # --- the derived step of the training mode ---------------------------------
  rows, length = len(PROMPTS), args.length
  example = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  pair = nnx_adapter.to_step(model, example, axis=1, batch_axis=0)
  state = nnx_adapter.state(model)
  shapes = jax.tree.leaves(pair.carry_spec())
  print(f"derived carry: {len(shapes)} arrays, "
        f"{sum(s.size * s.dtype.itemsize for s in shapes) / 1024:.0f} KiB "
        f"(keys and values at {args.kv_heads} heads per layer, positions)")

  # serving: prompts of different lengths, top-p, each row stops at "\n"
  prompt, lengths = right_padded(PROMPTS)
  steps = min(args.generate, length - int(lengths.max()) + 1)
  newline, pad = ord("\n"), 0
  top_p = sampling.top_p(args.top_p, temperature=args.temperature)
  out = pair.generate(state, prompt, steps, top_p, jax.random.key(args.seed),
                      lengths=lengths, stop_tokens=[newline], pad=pad)
  print(f"--- {rows} prompts, top_p({args.top_p}, temperature="
        f"{args.temperature}), stop at newline " + "-" * 20)
  for text, row in zip(PROMPTS, out):
    print(repr(text + completion(row, {newline}, pad)))
  print("-" * 71)

  # the stateful form: a Stepper bound to the model, greedy, one token a call
  stepper = pair.bind(model)
  logits = stepper.reset(prompt, lengths=lengths)
  token = jnp.argmax(logits[jnp.arange(rows), lengths - 1], -1)
  greedy_text = [token]
  for _ in range(min(24, length - int(lengths.max()))):
    token = jnp.argmax(stepper(token), -1)
    greedy_text.append(token)
  print("Stepper, greedy: " + repr(PROMPTS[0] + common.decode(
      jnp.stack(greedy_text, 1)[0])))

  # --- equivalence: prefill + steps against the training mode ----------------
  graphdef = nnx.graphdef(model)
  apply = jax.jit(lambda s, seq: nnx.merge(graphdef, s)(seq))
  windows, _ = next(common.batches(tokens, rows, length, args.seed + 1))
  sequence = jnp.asarray(windows)
  err, tol = common.check_equivalence(pair, state, apply, sequence)
  common.exit_unless_equivalent(err, tol)
  assert err < 1e-4, err

  # Flax's own decode mode: nnx.view with a cache of L positions
  decoder = nnx.view(model, decode=True, batch_size=rows, max_length=length)
  _, params_, cache = nnx.split(decoder, nnx.Param, nnx.Cache)
  decode_logits, decode_generate = decode_functions(decoder)
  decode_err = float(jnp.max(jnp.abs(
      decode_logits(params_, cache, sequence) - apply(state, sequence))))
  print(f"Flax decode mode: max |decode - training mode| = {decode_err:.2e}")
  if not decode_err <= tol:
    raise SystemExit("FAILED: the decode mode differs from the training mode")

  # --- time per generated token ----------------------------------------------
  p = args.timing_prompt
  timing_prompt = sequence[:, :p]
  n = length - p + 1                 # up to the last of the L positions
  rng = jax.random.key(args.seed + 2)
  greedy = sampling.greedy
  naive = common.naive_generator(lambda s, seq: nnx.merge(graphdef, s)(seq))
  runs = {
      "derived step (pair.generate)": lambda: pair.generate(
          state, timing_prompt, n, greedy, rng),
      "Flax decode=True cache": lambda: decode_generate(
          params_, cache, timing_prompt, n, greedy, rng),
      "naive recomputation": lambda: naive(state, timing_prompt, n, greedy,
                                           rng, length),
  }
  generated = {name: np.asarray(run()) for name, run in runs.items()}
  agree = [np.mean(g == generated["naive recomputation"])
           for g in generated.values()]
  times = {name: common.median_time(
      lambda run=run: jax.block_until_ready(run()),
      repeats=1 if args.smoke or "naive" in name else 3)
      for name, run in runs.items()}
  print(f"generating {n} tokens after a {p}-token prompt, batch {rows}, "
        f"greedy (tokens agreeing with naive: "
        f"{', '.join(f'{a:.0%}' for a in agree)}):")
  base = times["naive recomputation"]
  decode_time = times["Flax decode=True cache"]
  print(f"{'':<32}{'ms/token':>10}{'vs naive':>10}{'vs decode':>11}")
  for name, t in times.items():
    print(f"{name:<32}{1e3 * t / n:>10.3f}{base / t:>9.1f}x"
          f"{decode_time / t:>10.2f}x")


if __name__ == "__main__":
  main()
