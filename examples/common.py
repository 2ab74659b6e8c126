"""What the examples share: the corpus, training, the equivalence check and
the speed comparison against naive recomputation."""
import argparse
import pathlib
import sys
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

VOCAB = 128  # ASCII; other bytes become "?"


def python_corpus(max_bytes: int = 2_000_000) -> np.ndarray:
  """Bytes of the Python standard library's own source files (no download),
  as int32 token ids < VOCAB."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  chunks, total = [], 0
  for path in sorted(root.glob("*.py")):
    data = path.read_bytes()
    chunks.append(data)
    total += len(data)
    if total >= max_bytes:
      break
  tokens = np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8).astype(
      np.int32)
  tokens[tokens >= VOCAB] = ord("?")
  return tokens


def encode(text: str) -> np.ndarray:
  return np.array([min(ord(c), ord("?") if ord(c) >= VOCAB else ord(c))
                   for c in text], np.int32)


def decode(tokens) -> str:
  return "".join(chr(int(t)) for t in np.asarray(tokens).reshape(-1))


def batches(tokens: np.ndarray, batch: int, length: int, seed: int = 0):
  """Endless random windows: (inputs, targets), each [batch, length]."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(tokens) - length - 1, batch)
    window = np.stack([tokens[s:s + length + 1] for s in starts])
    yield window[:, :-1], window[:, 1:]


def train(model, tokens, *, steps, batch, length, learning_rate, seed=0,
          desc="training"):
  """Trains an hk.Transformed language model (tokens [B, T] -> logits
  [B, T, VOCAB]) with Adam; returns (params, losses)."""
  data = batches(tokens, batch, length, seed)
  inputs, _ = next(data)
  params = model.init(jax.random.key(seed), inputs)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adam(learning_rate))
  opt_state = optimizer.init(params)

  def loss_fn(params, inputs, targets):
    logits = model.apply(params, None, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, targets).mean()

  @jax.jit
  def update(params, opt_state, inputs, targets):
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  with tqdm(range(steps), desc=desc, unit="step") as bar:
    for i in bar:
      inputs, targets = next(data)
      params, opt_state, loss = update(params, opt_state, inputs, targets)
      if i % 10 == 0 or i == steps - 1:
        losses.append((i, float(loss)))
        bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
  return params, losses


def temperature_sampler(temperature: float):
  """sample(rng, logits [B, VOCAB]) -> tokens [B]."""
  def sample(rng, logits):
    if temperature == 0:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(rng, logits / temperature).astype(jnp.int32)
  return sample


def check_equivalence(pair, params, apply, sequence, axis=1, tol=1e-4):
  """Largest |step output - training-mode output| over ``sequence``
  (prefill of its first half, then one step per element)."""
  length = sequence.shape[axis]
  half = length // 2
  carry, out = pair.prefill(params, jax.lax.slice_in_dim(sequence, 0, half,
                                                         axis=axis))
  outs = [out]
  for t in range(half, length):
    x = jax.lax.index_in_dim(sequence, t, axis, keepdims=False)
    carry, y = pair.step(params, carry, x)
    outs.append(jnp.expand_dims(y, axis))
  stepped = jnp.concatenate(outs, axis)
  full = apply(params, sequence)
  return float(jnp.max(jnp.abs(stepped - full))), tol


def exit_unless_equivalent(err, tol):
  print(f"equivalence: max |step - training mode| = {err:.2e} "
        f"(tolerance {tol:.0e})")
  if not err <= tol:
    raise SystemExit("FAILED: the derived step differs from the training mode")


def median_time(fn, repeats=5):
  """Median wall time of ``fn()`` (which must block on its result)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def naive_generator(apply):
  """Generation by recomputation: ``generate(params, prompt, steps, sample,
  rng, length)`` re-runs the jitted training-mode model on the whole prefix
  (padded to ``length`` so it compiles once) for every token."""
  forward = jax.jit(lambda p, seq, t: jax.lax.dynamic_index_in_dim(
      apply(p, seq), t, 1, keepdims=False))

  def generate(params, prompt, steps, sample, rng, length):
    batch, prompt_length = prompt.shape
    seq = jnp.zeros((batch, length), prompt.dtype).at[:, :prompt_length].set(
        prompt)
    out = []
    rngs = jax.random.split(rng, steps)
    for i in range(steps):
      token = sample(rngs[i], forward(params, seq, prompt_length + i - 1))
      out.append(token)
      if prompt_length + i < length:
        seq = seq.at[:, prompt_length + i].set(token)
    return jnp.stack(out, 1)
  return generate


def speed_table(rows):
  """Prints rows of (name, tokens per second)."""
  base = rows[-1][1]
  print(f"{'':<34}{'tokens/s':>12}{'speed-up':>10}")
  for name, rate in rows:
    print(f"{name:<34}{rate:>12.1f}{rate / base:>9.1f}x")


def parser(description, **defaults):
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--smoke", action="store_true",
                 help="a few steps at tiny sizes (used by the tests)")
  for name, value in defaults.items():
    p.add_argument("--" + name.replace("_", "-"), type=type(value),
                   default=value)
  return p
