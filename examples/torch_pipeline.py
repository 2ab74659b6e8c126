"""A PyTorch pipeline around JAX: a torch sampling loop (temperature, top-k
with torch.topk, torch.multinomial) drives the derived transformer step
through scanagram.adapters.torch.TorchStepper, and a small torch module is
trained with torch autograd on features from a JAX function wrapped with
jax2torch.

Run: python examples/torch_pipeline.py [--smoke] [--help]
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import common
import transformer
from scanagram.adapters.haiku import to_step
from scanagram.adapters.torch import TorchStepper, jax2torch


def sample_top_k(logits: torch.Tensor, k: int, temperature: float,
                 generator: torch.Generator) -> torch.Tensor:
  """Torch-side sampling: [B, V] logits -> [B] int32 tokens."""
  values, indices = torch.topk(logits / temperature, k, dim=-1)
  probs = torch.softmax(values, dim=-1)
  choice = torch.multinomial(probs, 1, generator=generator)
  return indices.gather(-1, choice)[:, 0].to(torch.int32)


def generate(stepper, prompt, steps, k, temperature, seed):
  """Prefill from a torch prompt [B, P], then one TorchStepper call per
  token."""
  generator = torch.Generator().manual_seed(seed)
  logits = stepper.reset(prompt)[:, -1]
  out = []
  for _ in range(steps):
    token = sample_top_k(logits, k, temperature, generator)
    out.append(token)
    if len(out) < steps:
      logits = stepper(token)
  return torch.stack(out, 1)


def train_probe(params, model, tokens, length, steps, seed):
  """Trains, with torch autograd, a linear probe and a temperature that is
  an input of the JAX function: the probe predicts from the JAX model's
  next-character log-probabilities whether the next character is a space.
  Gradients for the temperature flow back through jax2torch (jax.vjp)."""
  @jax2torch
  def features(tokens, temperature):
    logits = model.apply(params, None, tokens)
    return jax.nn.log_softmax(logits / temperature)  # [B, T, V]

  torch.manual_seed(seed)
  probe = torch.nn.Linear(common.VOCAB, 1)
  temperature = torch.nn.Parameter(torch.ones(()))
  optimizer = torch.optim.Adam([*probe.parameters(), temperature], lr=1e-2)
  data = common.batches(tokens, 8, length, seed)
  for _ in range(steps):
    inputs, targets = next(data)
    x = features(torch.from_numpy(inputs), temperature)
    y = torch.from_numpy((targets == ord(" ")).astype(np.float32))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        probe(x)[..., 0], y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  return loss.item(), temperature.item()


def greedy(rng, logits):
  del rng
  return jnp.argmax(logits, -1)


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], d_model=64, heads=4, layers=2, length=64,
      batch=32, steps=300, learning_rate=3e-3, generate=48, top_k=8,
      temperature=0.8, prompt="class ", probe_steps=50,
      seed=0).parse_args(argv)
  if args.smoke:
    args.d_model, args.heads, args.layers, args.length = 16, 2, 1, 16
    args.batch, args.steps, args.generate, args.probe_steps = 4, 3, 6, 3
  model = transformer.make_model(args.d_model, args.heads, args.layers,
                                 args.length)
  tokens = common.python_corpus(200_000 if args.smoke else 2_000_000)
  params, _ = common.train(model, tokens, steps=args.steps, batch=args.batch,
                           length=args.length,
                           learning_rate=args.learning_rate, seed=args.seed)
  pair = to_step(model, jax.ShapeDtypeStruct((1, args.length), jnp.int32),
                 axis=1)
  stepper = TorchStepper(pair, params)
  prompt = torch.from_numpy(common.encode(args.prompt))[None]
  steps = min(args.generate, args.length - prompt.shape[1])
  generated = generate(stepper, prompt, steps, args.top_k, args.temperature,
                       args.seed)
  print("--- sample (torch top-k sampling) " + "-" * 37)
  print(args.prompt + common.decode(generated.numpy()))
  print("-" * 71)

  # the stepper's logits against the JAX training mode on the same sequence
  sequence = torch.cat([prompt, generated], 1)
  stepped = [stepper.reset(sequence[:, :prompt.shape[1]])]
  for t in range(prompt.shape[1], sequence.shape[1]):
    stepped.append(stepper(sequence[:, t])[:, None])
  stepped = torch.cat(stepped, 1).numpy()
  full = np.asarray(model.apply(params, None, jnp.asarray(sequence.numpy())))
  err = float(np.abs(stepped - full).max())

  chunk = sequence[:, prompt.shape[1]:]
  stepper.reset(sequence[:, :prompt.shape[1]])
  ran = stepper.run(chunk).numpy()               # N steps, one dispatch
  err = max(err, float(np.abs(ran - full[:, prompt.shape[1]:]).max()))
  common.exit_unless_equivalent(err, 1e-4)      # single steps and run()

  def torch_loop():
    stepper.reset(prompt)
    for t in range(steps):
      stepper(generated[:, t])

  def torch_run():
    stepper.reset(prompt)
    stepper.run(generated)

  naive = common.naive_generator(lambda p, seq: model.apply(p, None, seq))
  jax_prompt = jnp.asarray(prompt.numpy())

  def naive_loop():
    jax.block_until_ready(naive(params, jax_prompt, steps, greedy,
                                jax.random.key(0), args.length))
  print(f"generating {steps} tokens, batch 1:")
  common.speed_table([
      ("TorchStepper, one call per token", steps / common.median_time(
          torch_loop, repeats=3)),
      ("TorchStepper.run, one dispatch", steps / common.median_time(
          torch_run, repeats=3)),
      ("naive recomputation (JAX)", steps / common.median_time(
          naive_loop, repeats=3))])

  start = time.perf_counter()
  loss, temperature = train_probe(params, model, tokens, args.length,
                                  args.probe_steps, args.seed)
  print(f"torch probe on jax2torch features: loss {loss:.3f}, learned "
        f"temperature {temperature:.3f} after {args.probe_steps} steps "
        f"({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
  main()
