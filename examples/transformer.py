"""A small GPT-style decoder in Haiku, trained on the Python standard
library's source, then generating through the derived KV-cache step.

Written once, in training mode: token and learned position embeddings,
pre-LayerNorm blocks of hk.MultiHeadAttention with a causal mask and an MLP.
`scanagram.adapters.haiku.to_step` derives prefill and a step whose carry is each
layer's key/value cache; `pair.generate` runs generation as one compiled
loop. The script checks the step against the training mode (exits non-zero
if they differ), compares its speed with naive recomputation and writes
out/transformer.png (loss curve, per-token latency against position).

Run: python examples/transformer.py [--smoke] [--help]
"""
import pathlib
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import common
from scanagram.adapters.haiku import to_step

OUT = pathlib.Path(__file__).resolve().parent.parent / "out"


def make_model(d_model, heads, layers, length, use_layer_stack=False):
  """hk.Transformed: tokens [B, T] (T <= length) -> logits [B, T, VOCAB]."""
  def block(h, mask):
    a = hk.LayerNorm(-1, True, True)(h)
    h = h + hk.MultiHeadAttention(
        heads, d_model // heads,
        w_init=hk.initializers.VarianceScaling(1.0))(a, a, a, mask=mask)
    m = hk.LayerNorm(-1, True, True)(h)
    return h + hk.nets.MLP([4 * d_model, d_model], activation=jax.nn.gelu)(m)

  def forward(tokens):
    t = tokens.shape[1]
    h = hk.Embed(common.VOCAB, d_model)(tokens)
    positions = hk.get_parameter("positions", [length, d_model],
                                 init=hk.initializers.TruncatedNormal(0.02))
    h = h + positions[jnp.arange(t)]
    mask = jnp.tril(jnp.ones((1, 1, t, t), bool))
    if use_layer_stack:
      h = hk.layer_stack(layers)(lambda h: block(h, mask))(h)
    else:
      for _ in range(layers):
        h = block(h, mask)
    return hk.Linear(common.VOCAB)(hk.LayerNorm(-1, True, True)(h))
  return hk.transform(forward)


def latency_by_position(pair, apply, params, length, batch, repeats=5):
  """Per-token seconds at each position (median of ``repeats`` passes) for
  the derived step and for naive recomputation (prefix padded to the next
  power of two, so it compiles once per bucket)."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  step = jax.jit(pair.step)
  x = tokens[:, 0]
  derived = np.zeros((repeats, length - 1))
  for r in range(repeats):
    carry, _ = pair.prefill(params, tokens[:, :1])
    jax.block_until_ready(step(params, carry, x))
    for t in range(length - 1):
      start = time.perf_counter()
      carry, y = step(params, carry, x)
      jax.block_until_ready(y)
      derived[r, t] = time.perf_counter() - start
  forward = jax.jit(apply)
  naive = np.zeros((repeats, length - 1))
  for t in range(1, length):
    prefix = tokens[:, :min(length, 1 << t.bit_length())]
    jax.block_until_ready(forward(params, prefix))
    for r in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(forward(params, prefix))
      naive[r, t - 1] = time.perf_counter() - start
  return np.median(derived, 0), np.median(naive, 0)


def plot(losses, derived, naive, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  steps, values = zip(*losses)
  left.plot(steps, values)
  left.set(xlabel="training step", ylabel="cross-entropy (nats/char)",
           title="training loss")
  positions = np.arange(1, len(derived) + 1)
  right.plot(positions, 1e3 * naive, label="naive recomputation")
  right.plot(positions, 1e3 * derived, label="derived step (KV cache)")
  right.set(xlabel="position", ylabel="ms per token", yscale="log",
            title="per-token latency")
  right.legend()
  fig.tight_layout()
  path.parent.mkdir(exist_ok=True)
  fig.savefig(path, dpi=100)
  print(f"wrote {path}")


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], d_model=128, heads=4, layers=3, length=128,
      batch=32, steps=500, learning_rate=3e-3, generate=200, temperature=0.7,
      prompt="def ", seed=0, layer_stack=0).parse_args(argv)
  if args.smoke:
    args.d_model, args.heads, args.layers, args.length = 32, 2, 2, 16
    args.batch, args.steps, args.generate = 4, 3, 8
  model = make_model(args.d_model, args.heads, args.layers, args.length,
                     bool(args.layer_stack))
  tokens = common.python_corpus(200_000 if args.smoke else 2_000_000)
  print(f"corpus: {len(tokens):,} characters of the Python standard library")
  params, losses = common.train(
      model, tokens, steps=args.steps, batch=args.batch, length=args.length,
      learning_rate=args.learning_rate, seed=args.seed)

  apply = lambda p, seq: model.apply(p, None, seq)  # noqa: E731
  example = jax.ShapeDtypeStruct((1, args.length), jnp.int32)
  pair = to_step(model, example, axis=1)
  shapes = jax.tree.leaves(pair.carry_spec())
  print(f"derived carry: {len(shapes)} arrays, "
        f"{sum(s.size * s.dtype.itemsize for s in shapes) / 1024:.0f} KiB "
        "(keys and values per layer, and the position)")

  prompt = jnp.asarray(common.encode(args.prompt))[None]
  steps = min(args.generate, args.length - prompt.shape[1] + 1)
  sample = common.temperature_sampler(args.temperature)
  rng = jax.random.key(args.seed + 1)
  generated = pair.generate(params, prompt, steps, sample, rng)
  print("--- sample " + "-" * 60)
  print(args.prompt + common.decode(generated))
  print("-" * 71)

  sequence = jnp.concatenate([prompt, generated], 1)[:, :args.length]
  err, tol = common.check_equivalence(pair, params, apply, sequence)
  common.exit_unless_equivalent(err, tol)

  greedy = common.temperature_sampler(0.0)
  derived_time = common.median_time(lambda: jax.block_until_ready(
      pair.generate(params, prompt, steps, greedy, rng)), repeats=3)
  naive = common.naive_generator(apply)
  naive_time = common.median_time(lambda: jax.block_until_ready(
      naive(params, prompt, steps, greedy, rng,
                            args.length)), repeats=1 if args.smoke else 2)
  print(f"generating {steps} tokens, batch 1:")
  common.speed_table([("derived step (pair.generate)", steps / derived_time),
                      ("naive recomputation", steps / naive_time)])

  derived, naive = latency_by_position(pair, apply, params, args.length, 1)
  plot(losses, derived, naive, OUT / ("transformer_smoke.png" if args.smoke
                                      else "transformer.png"))


if __name__ == "__main__":
  main()
