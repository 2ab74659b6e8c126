"""A WaveNet-style stack of dilated causal hk.Conv1D layers on a synthetic
waveform (a mixture of sines with noise, quantised to 64 levels), trained to
predict the next sample, then generating through the derived step.

The conversion derives Fast WaveNet's queues by itself: each causal
convolution keeps a ring of its last (kernel - 1) * rate inputs, so a step
costs one position per layer instead of the whole receptive field.

Run: python examples/wavenet.py [--smoke] [--help]
"""
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import common
from scanagram.adapters.haiku import to_step

LEVELS = 64


def waveform(length, seed=0):
  """Quantised samples in [0, LEVELS) of a noisy mixture of three sines."""
  rng = np.random.default_rng(seed)
  t = np.arange(length)
  x = sum(np.sin(2 * np.pi * t / p + rng.uniform(0, 6)) for p in (23, 57, 131))
  x = x / 3 + 0.05 * rng.standard_normal(length)
  return np.clip(((x + 1) / 2 * LEVELS).astype(np.int32), 0, LEVELS - 1)


def make_model(channels, layers):
  """hk.Transformed: samples [B, T] -> logits [B, T, LEVELS]."""
  def forward(samples):
    h = hk.Embed(LEVELS, channels)(samples)
    skips = 0
    for i in range(layers):
      rate = 2 ** i
      conv = hk.Conv1D(2 * channels, 2, rate=rate, padding=hk.pad.causal)
      filt, gate = jnp.split(conv(h), 2, axis=-1)
      z = jnp.tanh(filt) * jax.nn.sigmoid(gate)
      h = h + hk.Conv1D(channels, 1)(z)
      skips = skips + hk.Conv1D(channels, 1)(z)
    return hk.Conv1D(LEVELS, 1)(jax.nn.relu(skips))
  return hk.transform(forward)


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], channels=32, layers=8, length=512, batch=16,
      steps=300, learning_rate=3e-3, generate=400, temperature=0.5,
      seed=0).parse_args(argv)
  if args.smoke:
    args.channels, args.layers, args.length = 8, 3, 32
    args.batch, args.steps, args.generate = 2, 3, 16
  receptive = 2 ** args.layers
  print(f"{args.layers} dilated causal layers, receptive field {receptive}")
  model = make_model(args.channels, args.layers)
  samples = waveform(200_000 if not args.smoke else 5_000, args.seed)
  params, _ = common.train(model, samples, steps=args.steps,
                           batch=args.batch, length=args.length,
                           learning_rate=args.learning_rate, seed=args.seed)
  apply = lambda p, seq: model.apply(p, None, seq)  # noqa: E731
  max_length = args.length + args.generate
  pair = to_step(model, jax.ShapeDtypeStruct((1, max_length), jnp.int32),
                 axis=1)
  rings = [s.shape for s in jax.tree.leaves(pair.carry_spec())]
  print(f"derived carry: {rings}  (one queue per dilated layer)")

  prompt = jnp.asarray(samples[:args.length])[None]
  sample = common.temperature_sampler(args.temperature)
  rng = jax.random.key(args.seed + 1)
  generated = pair.generate(params, prompt, args.generate, sample, rng)
  print("generated samples:", np.asarray(generated[0, :32]).tolist(), "...")

  sequence = jnp.concatenate([prompt, generated], 1)[:, :max_length]
  err, tol = common.check_equivalence(pair, params, apply, sequence)
  common.exit_unless_equivalent(err, tol)

  greedy = common.temperature_sampler(0.0)
  steps = args.generate
  derived_time = common.median_time(lambda: jax.block_until_ready(
      pair.generate(params, prompt, steps, greedy, rng)), repeats=3)
  naive = common.naive_generator(apply)
  naive_time = common.median_time(lambda: jax.block_until_ready(
      naive(params, prompt, steps, greedy, rng,
                            max_length)), repeats=1)
  print(f"generating {steps} samples, batch 1:")
  common.speed_table([("derived step (Fast-WaveNet queues)",
                       steps / derived_time),
                      ("naive recomputation", steps / naive_time)])


if __name__ == "__main__":
  main()
