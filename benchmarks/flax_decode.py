"""Flax: the derived step of a linen decoder against Flax's own ``decode=True``
cache, and the cost of ``generate``'s loop around the step.

The model (:class:`Decoder`) is a linen decoder as Flax users write one:
``nn.Embed``, layers of ``nn.LayerNorm`` + ``nn.SelfAttention`` + an MLP, a
``nn.Dense`` head. In training it takes whole sequences with
``nn.make_causal_mask``; with ``decode=True`` the same parameters run Flax's
cached decoding (a ``cache`` collection of ``[B, L, H, dh]`` keys and
values, a ``cache_index``), one token per ``apply(..., mutable=["cache"])``.
The derived side is ``scanagram.StepPair`` of the training mode
(``module.apply(variables, tokens)``, variables unscanned).

Both sides are checked against the training mode on the same tokens, then
N steps of each run in one jitted ``lax.scan`` (carry donated),
interleaved, medians.

JSON keys:
* ``flax_step_ratio``: derived step / Flax ``decode=True`` step (target
  <= 0.8); diagnostics ``flax_step_ms_derived``, ``flax_step_ms_decode``.
* ``generate_loop_overhead``: per-token time of ``pair.generate`` with
  ``top_p`` sampling and stop tokens / the step alone in a ``lax.scan``
  (target <= 1.2).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram
from scanagram import sampling
from benchmarks.timing import interleaved

FULL = dict(batch=8, length=512, d_model=256, heads=4, layers=4, vocab=256,
            steps=64, repeats=15, warmup=1)
SMOKE = dict(batch=2, length=16, d_model=16, heads=2, layers=2, vocab=32,
             steps=6, repeats=2, warmup=1)


class Block(nn.Module):
  heads: int
  decode: bool = False

  @nn.compact
  def __call__(self, h, mask=None):
    d = h.shape[-1]
    h = h + nn.SelfAttention(self.heads, decode=self.decode,
                             deterministic=True, name="attn")(
                                 nn.LayerNorm(name="norm_attn")(h), mask=mask)
    x = nn.LayerNorm(name="norm_mlp")(h)
    return h + nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(x)))


class Decoder(nn.Module):
  """Token ids ``[B, T]`` -> logits ``[B, T, V]``."""
  vocab: int
  d_model: int
  heads: int
  layers: int
  decode: bool = False

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
    # decode=True attends over its cache up to cache_index: no mask
    mask = None if self.decode else nn.make_causal_mask(tokens)
    for i in range(self.layers):
      h = Block(self.heads, self.decode, name=f"block_{i}")(h, mask)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="norm")(h))


def _scan(step):
  """``run(variables, carry, tokens [B, N]) -> (carry, logits [B, N, V])``,
  N steps in one ``lax.scan``, the carry donated."""
  def run(variables, carry, tokens):
    carry, ys = lax.scan(lambda c, t: step(variables, c, t), carry,
                         tokens.T)
    return carry, jnp.moveaxis(ys, 0, 1)
  return jax.jit(run, donate_argnums=1)


def bench_flax(results: dict, config=None) -> None:
  """Adds ``flax_step_ratio`` and ``generate_loop_overhead`` (with
  diagnostics) to ``results``."""
  c = FULL if config is None else config
  b, n, v = c["batch"], c["length"], c["vocab"]
  sizes = dict(vocab=v, d_model=c["d_model"], heads=c["heads"],
               layers=c["layers"])
  train, decode = Decoder(**sizes), Decoder(**sizes, decode=True)
  tokens = jax.random.randint(jax.random.key(1), (b, n), 0, v)
  params = jax.jit(train.init)(jax.random.key(0), tokens)["params"]
  variables = {"params": params}
  # Flax's cache for L positions: init of the decode module on [B, L]
  cache = jax.jit(decode.init)(jax.random.key(0), tokens)["cache"]

  pair = scanagram.StepPair(lambda var, ids: train.apply(var, ids), None,
                            tokens, axis=1, num_unscanned=1,
                            names=("variables",))

  def decode_step(var, cache, token):
    logits, mutated = decode.apply({**var, "cache": cache}, token[:, None],
                                   mutable=["cache"])
    return mutated["cache"], logits[:, 0]
  runs = {
      "derived": (lambda: pair.init(variables),
                  _scan(lambda var, c, t: pair.functions.step(var, c, t))),
      "decode": (lambda: jax.tree.map(jnp.copy, cache), _scan(decode_step)),
  }
  xs = tokens[:, :c["steps"]]
  want = jax.jit(train.apply)(variables, tokens)[:, :c["steps"]]
  for side, (init, run) in runs.items():
    _, ys = run(variables, init(), xs)
    if not np.allclose(np.asarray(ys), np.asarray(want), atol=1e-4,
                       rtol=1e-4):
      err = float(jnp.max(jnp.abs(ys - want)))
      raise AssertionError(f"flax {side} step: logits differ from the "
                           f"training mode by {err}")
  t = interleaved({side: (init, lambda carry, run=run: run(variables, carry,
                                                            xs))
                   for side, (init, run) in runs.items()},
                  repeats=c["repeats"], warmup=c["warmup"])
  steps = xs.shape[1]
  results["flax_step_ratio"] = t["derived"] / t["decode"]
  results["flax_step_ms_derived"] = 1e3 * t["derived"] / steps
  results["flax_step_ms_decode"] = 1e3 * t["decode"] / steps

  # generate: a prompt of one token, then steps - 1 sampled ones, against
  # the same number of steps in a lax.scan (the stop token is one that
  # top_p at p=0.9 is free to pick, so the stop test is real work)
  top_p, stop = sampling.top_p(0.9), [int(v - 1)]
  prompt = tokens[:, :1]

  def generated(_):
    return pair.generate(variables, prompt, steps, top_p, 0,
                         stop_tokens=stop, pad=0)
  step_run = runs["derived"][1]
  t = interleaved({"generate": (lambda: None, generated),
                   "steps": (runs["derived"][0],
                             lambda carry: step_run(variables, carry, xs))},
                  repeats=c["repeats"], warmup=c["warmup"])
  results["generate_loop_overhead"] = t["generate"] / t["steps"]
  results["generate_ms_per_token"] = 1e3 * t["generate"] / steps


if __name__ == "__main__":
  import sys
  out = {}
  bench_flax(out, SMOKE if "--smoke" in sys.argv else FULL)
  for key, value in out.items():
    print(f"{key}: {value:.4g}")
