"""A character-level LSTM language model in Haiku, trained on the Python
standard library's source, sampling text through the derived step.

The model is written for training only: hk.Embed, an hk.LSTM unrolled with
hk.dynamic_unroll over batch-major [B, T] tokens, hk.Linear. The derived
step carries the LSTM's (h, c) and a position counter.

Run: python examples/rnn.py [--smoke] [--help]
"""
import haiku as hk
import jax
import jax.numpy as jnp

import common
from scanagram.adapters.haiku import to_step


def make_model(hidden):
  """hk.Transformed: tokens [B, T] -> logits [B, T, VOCAB]."""
  def forward(tokens):
    h = hk.Embed(common.VOCAB, 64)(tokens)
    core = hk.LSTM(hidden)
    h, _ = hk.dynamic_unroll(core, h, core.initial_state(tokens.shape[0]),
                             time_major=False)
    return hk.Linear(common.VOCAB)(h)
  return hk.transform(forward)


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], hidden=256, length=64, batch=32, steps=500,
      learning_rate=5e-3, generate=200, temperature=0.6, prompt="import ",
      seed=0).parse_args(argv)
  if args.smoke:
    args.hidden, args.length, args.batch, args.steps = 32, 16, 4, 3
    args.generate = 8
  model = make_model(args.hidden)
  tokens = common.python_corpus(200_000 if args.smoke else 2_000_000)
  params, _ = common.train(model, tokens, steps=args.steps, batch=args.batch,
                           length=args.length,
                           learning_rate=args.learning_rate, seed=args.seed)
  apply = lambda p, seq: model.apply(p, None, seq)  # noqa: E731
  max_length = max(args.length, len(args.prompt) + args.generate)
  pair = to_step(model, jax.ShapeDtypeStruct((1, max_length), jnp.int32),
                 axis=1)
  print("derived carry:", jax.tree.map(lambda s: s.shape, pair.carry_spec()))

  prompt = jnp.asarray(common.encode(args.prompt))[None]
  sample = common.temperature_sampler(args.temperature)
  rng = jax.random.key(args.seed + 1)
  generated = pair.generate(params, prompt, args.generate, sample, rng)
  print("--- sample " + "-" * 60)
  print(args.prompt + common.decode(generated))
  print("-" * 71)

  sequence = jnp.concatenate([prompt, generated], 1)
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
  print(f"generating {steps} characters, batch 1:")
  common.speed_table([("derived step (pair.generate)", steps / derived_time),
                      ("naive recomputation", steps / naive_time)])


if __name__ == "__main__":
  main()
