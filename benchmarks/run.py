"""Runs every benchmark side by side and writes out/bench.json and
out/bench.png.

Usage: python -m benchmarks.run [--smoke] [--out DIR]

Each comparison builds both sides from one Haiku model and its parameters:
the derived side with ``scanagram.adapters.haiku.to_step``, the hand-written side
from :mod:`benchmarks.baselines`. It first checks that both compute the
same outputs (``allclose`` against ``model.apply``), then times them in the
same process, interleaved, after warm-up, jitted and blocked on the result,
and reports medians. Per-token times come from N steps inside one jitted
``lax.scan`` with the carry donated (the same loop wrapped around either
step), so they measure the compiled steps, not Python dispatch; the
per-call figures (``*_call_ratio``) measure one jitted, donated call per
token from Python.

JSON keys (figure name -> number):
  lstm_step_ratio, wavenet_step_ratio, lru_step_ratio,
    transformer_step_ratio: derived / hand-written per-token time (target
    <= 1.10); lru is a stack of diagonal linear recurrences trained with
    scanagram.associative_scan.
  transformer_carry_bytes_ratio: derived carry / hand-written cache bytes
    (target <= 1.05).
  step_hlo_ratio: characters of the derived transformer step's optimised
    HLO / the hand-written one's, metadata left out (target <= 1.2);
    step_hlo_instructions_ratio: the same in lines.
  transformer_speedup_vs_recompute_T512: naive recomputation (the jitted
    training-mode model on the prefix padded to L) / pair.generate, per
    token, generating L tokens (target >= 20).
  convert_compile_ratio_24_layers: to_step + compiling the step / compiling
    the training-mode forward, 24-layer transformer (target <= 2.0), and
    convert_seconds_<n>_layers, compile_step_seconds_<n>_layers,
    compile_forward_seconds_<n>_layers per depth.
  torch_step_ratio: TorchStepper call / the same jitted, donated step called
    from JAX, median per call, the two taking turns call by call (target <=
    1.15); torch_run_speedup: 64 TorchStepper calls / one TorchStepper.run
    over 64 steps.
  extend8_over_step: one jitted extend of 8 tokens / one jitted step, both
    from the carry after a prefill of 256 (carry donated; a fresh copy per
    call, made untimed), bench transformer (target <= 2.5).
  chunked_prefill_ratio: a prompt of L=512 tokens as a prefill of 128 and 3
    extends of 128 / one prefill of 512 (target <= 1.3).
  gqa_carry_bytes_ratio, gqa_step_ratio: a decoder with 8 query heads over
    2 key/value heads (jnp.repeat in the training mode): derived carry /
    hand-written grouped cache bytes (target <= 1.05), derived / hand-written
    grouped step per-token time (target <= 1.10).
  encdec_step_ratio: a 2-layer encoder-decoder (source length 512): the
    derived step (encoder and cross-attention keys/values computed once in
    prefill, carried) / a hand-written step with cached cross-attention
    keys/values (target <= 1.10).
  flax_step_ratio: derived step of a linen decoder (4 layers, d=256, L=512,
    batch 8) / Flax's own decode=True step for the same parameters (target
    <= 0.8); generate_loop_overhead: per-token time of pair.generate with
    top_p sampling and stop tokens / the step alone (target <= 1.2).
  blockwise_step_ratio: a 4-layer decoder (d=256, 4 heads, L=2048, batch
    4) trained with block-wise attention (blocks of 128, kernel-sum form):
    its derived step / the derived step of the same decoder written with
    plain attention (target <= 1.05); blockwise_prefill_peak_ratio: XLA's
    temporary bytes of its prefill of 2048 tokens / its training forward's
    (target <= 1.2; benchmarks/blockwise.py).
  sharded_step_ratio: the make-demo transformer (examples/transformer.py)
    served on a 2x4 (data, model) mesh of 8 host devices (a fresh process
    with --xla_force_host_platform_device_count=8), Megatron-style
    parameters, L=256: derived step / the hand-written KV-cache step on the
    same mesh (caches batch over data, heads over model; jitted with in/out
    shardings, carry donated), per-token time (target <= 1.10);
    sharded_collectives_extra: collectives in the derived step's compiled
    HLO minus the hand-written one's (target <= 0); the counts as
    sharded_step_collectives and sharded_handwritten_collectives.
  convert_seconds_L32768, convert_peak_mib_L32768: to_step of a 2-layer,
    4-head causal transformer (batch 8, L=32768) in a fresh process, the
    worst of four mask styles (tril, arange comparison, hk.MultiHeadAttention
    with a [1, 1, L, L] mask, a sliding window): seconds (target <= 5) and
    peak RSS growth in MiB (target <= 500); per style as
    convert_seconds_L32768_<style>. (The same at smoke sizes: L=32768 costs
    well under a second to convert.)
  ragged_generate_ratio: per-token time of greedy pair.generate from prompts
    of lengths drawn from 1..128 per row (to_step(..., batch_axis=0),
    generate(..., lengths=)) / from prompts of 128 in every row (the
    conversion without rows); per-token time is (time of 80 steps - time of
    16 steps) / 64, so the prefill cancels (target <= 1.15).
  ragged_generate_ratio_same_conversion: the same ragged generation / rows
    all at 128 with the same (rows) conversion: the cost of raggedness;
    rows_generate_ratio_vs_uniform: rows all at 128 with the rows conversion
    / the uniform conversion: the cost of per-row positions.

Diagnostics (no target): ``*_step_ms_*`` and ``*_generate_ms_per_token_*``
(absolute times), ``*_call_ratio`` (one dispatch per token),
``transformer_step_ratio_vs_model_layout`` and
``transformer_generate_ratio_vs_model_layout`` (against the hand-written
step with its caches in Haiku's ``[B, L, H, dh]`` layout, the layout the
derived carry had before it was fixed: the cost of that layout),
``compile_hand_written_step_seconds_<n>_layers`` and
``hand_written_compile_ratio_24_layers`` (what compiling a hand-written
step costs against the forward), ``compile_forward_one_token_seconds_<n>_layers``
and ``one_token_forward_compile_ratio_24_layers`` (the forward compiled for a
one-token input, no cache: XLA's cost of a program of one-token products),
``jax_host_input_ratio`` (the jitted step called from JAX with ``x`` a
host NumPy array each call / with ``x`` already a JAX array: what importing
an input per call costs JAX's CPU runtime, as TorchStepper must),
``torch_step_ratio_vs_host_input`` (TorchStepper / that host-input JAX
loop: the adapter's own cost), ``torch_run_ratio_vs_jax_run``
(TorchStepper.run of 64 steps / the same compiled run called from JAX: ~1
when a chunk crosses the boundary once),
``convert_seconds_growth_vs_linear`` (~1 when conversion time grows
linearly with depth), ``extend8_ms_at_256``, ``step_ms_at_256``,
``chunked_prefill_ms_4x128``, ``prefill_ms_512`` and
``generate_ms_per_token_{uniform,ragged,rows_full}`` (the absolute times
behind the block figures), the machine's
``cpu_count`` and ``load_average_1min``, and ``smoke``.
"""
import argparse
import gc
import json
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from scanagram.adapters.haiku import to_step
from benchmarks import (baselines, blockwise, encdec, flax_decode, long_context, models,
                        sharded)
from benchmarks.timing import interleaved, interleaved_calls, seconds

FULL = dict(
    batch=8, repeats=15, warmup=1, call_repeats=15, calls=32,
    lstm=dict(input=64, hidden=256, length=256, steps=256),
    wavenet=dict(input=32, channels=64, layers=8, out=64, length=512,
                 steps=256),
    lru=dict(input=32, width=128, state=256, layers=4, out=64, length=512,
             steps=256),
    transformer=dict(d_model=256, heads=4, layers=4, length=512, vocab=256,
                     steps=64, naive_tokens=4, generate_repeats=7,
                     latency_positions=(1, 64, 128, 256, 384, 512),
                     extend_at=256, extend_block=8, chunk=128,
                     block_repeats=31, ragged_prompt=128,
                     ragged_steps=(16, 80), ragged_repeats=9),
    gqa=dict(d_model=256, heads=8, kv_heads=2, layers=4, length=512,
             vocab=256, steps=64),
    depths=(2, 6, 12, 24), convert_repeats=5, torch_calls=64,
)
SMOKE = dict(
    batch=2, repeats=2, warmup=1, call_repeats=2, calls=4,
    lstm=dict(input=4, hidden=8, length=16, steps=16),
    wavenet=dict(input=3, channels=8, layers=3, out=5, length=16, steps=16),
    lru=dict(input=3, width=8, state=8, layers=2, out=5, length=16, steps=16),
    transformer=dict(d_model=16, heads=2, layers=2, length=16, vocab=32,
                     steps=8, naive_tokens=2, generate_repeats=2,
                     latency_positions=(1, 8, 16), extend_at=8,
                     extend_block=8, chunk=4, block_repeats=2,
                     ragged_prompt=4, ragged_steps=(2, 10), ragged_repeats=2),
    gqa=dict(d_model=16, heads=4, kv_heads=2, layers=2, length=16,
             vocab=32, steps=8),
    depths=(1, 2), convert_repeats=1, torch_calls=4,
)
TARGETS = {
    "lstm_step_ratio": ("<=", 1.10),
    "wavenet_step_ratio": ("<=", 1.10),
    "lru_step_ratio": ("<=", 1.10),
    "transformer_step_ratio": ("<=", 1.10),
    "transformer_carry_bytes_ratio": ("<=", 1.05),
    "transformer_speedup_vs_recompute_T512": (">=", 20.0),
    "convert_compile_ratio_24_layers": ("<=", 2.0),
    "torch_step_ratio": ("<=", 1.15),
    "extend8_over_step": ("<=", 2.5),
    "chunked_prefill_ratio": ("<=", 1.3),
    "ragged_generate_ratio": ("<=", 1.15),
    "gqa_carry_bytes_ratio": ("<=", 1.05),
    "gqa_step_ratio": ("<=", 1.10),
    "step_hlo_ratio": ("<=", 1.2),
    "encdec_step_ratio": ("<=", 1.10),
    "convert_seconds_L32768": ("<=", 5.0),
    "convert_peak_mib_L32768": ("<=", 500.0),
    "flax_step_ratio": ("<=", 0.8),
    "generate_loop_overhead": ("<=", 1.2),
    "sharded_step_ratio": ("<=", 1.10),
    "sharded_collectives_extra": ("<=", 0),
    "blockwise_step_ratio": ("<=", 1.05),
    "blockwise_prefill_peak_ratio": ("<=", 1.2),
}


def required_keys(config):
  """The JSON keys a run with ``config`` writes (the smoke test checks)."""
  keys = list(TARGETS) + ["torch_run_speedup",
                          "ragged_generate_ratio_same_conversion",
                          "rows_generate_ratio_vs_uniform",
                          "sharded_step_collectives",
                          "sharded_handwritten_collectives"]
  for n in config["depths"]:
    keys += [f"convert_seconds_{n}_layers", f"compile_step_seconds_{n}_layers",
             f"compile_forward_seconds_{n}_layers"]
  return keys


def log(*args):
  print(*args, flush=True)


def check_close(name, got, want, tol=1e-4):
  """Both sides must compute the model's outputs: a benchmark never compares
  different math."""
  err = float(jnp.max(jnp.abs(got - want)))
  scale = float(jnp.max(jnp.abs(want))) + 1e-6
  if not np.allclose(np.asarray(got), np.asarray(want), atol=tol * scale,
                     rtol=tol):
    raise AssertionError(f"{name}: outputs differ from model.apply by {err} "
                         f"(scale {scale})")
  return err


def step_comparison(name, model, params, xs, bases, pair, config, results):
  """Per-token time of ``steps`` steps in one jitted lax.scan (carry
  donated) for the derived and the hand-written steps; per-call time of one
  jitted, donated step called from Python.

  ``bases``: dict suffix -> hand-written step object; the first is the
  baseline of the figures ``<name>_step_ratio`` and ``<name>_call_ratio``,
  the others (diagnostics) give ``<name>_step_ratio_vs_<suffix>``."""
  want = model.apply(params, None, xs)
  runs = {"derived": (pair.init, baselines.scan_steps(pair.functions.step))}
  runs.update({suffix: (base.init, baselines.scan_steps(base.step))
               for suffix, base in bases.items()})
  for side, (init, run) in runs.items():
    _, ys = run(params, init(params), xs)
    check_close(f"{name} {side} step", ys, want)

  n = xs.shape[1]
  t = interleaved({
      side: (lambda init=init: init(params),
             lambda c, run=run: run(params, c, xs))
      for side, (init, run) in runs.items()},
      repeats=config["repeats"], warmup=config["warmup"])
  first = next(iter(bases))
  for suffix in bases:
    key = (f"{name}_step_ratio" if suffix == first else
           f"{name}_step_ratio_vs_{suffix}")
    results[key] = t["derived"] / t[suffix]
    results[f"{name}_step_ms_{suffix}"] = 1e3 * t[suffix] / n
  results[f"{name}_step_ms_derived"] = 1e3 * t["derived"] / n

  calls = {"derived": (pair.init, jax.jit(pair.functions.step,
                                          donate_argnums=1)),
           first: (bases[first].init, baselines.donated(bases[first].step))}
  x_elems = [xs[:, i] for i in range(config["calls"])]

  def call_loop(call):
    def work(carry):
      for x in x_elems:
        carry, y = call(params, carry, x)
      return y
    return work
  t = interleaved({side: (lambda init=init: init(params), call_loop(call))
                   for side, (init, call) in calls.items()},
                  repeats=config["call_repeats"], warmup=config["warmup"])
  results[f"{name}_call_ratio"] = t["derived"] / t[first]
  log(f"  {name}: step ratio {results[f'{name}_step_ratio']:.3f} "
      f"({results[f'{name}_step_ms_derived']:.3f} vs "
      f"{results[f'{name}_step_ms_{first}']:.3f} ms/token), "
      f"per-call ratio {results[f'{name}_call_ratio']:.3f}")


def bench_lstm(config, results):
  c, b = config["lstm"], config["batch"]
  model = models.lstm(c["hidden"])
  xs = jax.random.normal(jax.random.key(1), (b, c["length"], c["input"]))
  params = model.init(jax.random.key(0), xs)
  pair = to_step(model, xs, axis=1)
  base = baselines.LSTMStep(c["hidden"], b)
  step_comparison("lstm", model, params, xs[:, :c["steps"]],
                  {"hand_written": base}, pair,
                  config, results)
  return pair, params, xs


def bench_lru(config, results):
  c, b = config["lru"], config["batch"]
  model = models.lru(c["width"], c["state"], c["layers"], c["out"])
  xs = jax.random.normal(jax.random.key(1), (b, c["length"], c["input"]))
  params = model.init(jax.random.key(0), xs)
  pair = to_step(model, xs, axis=1)
  base = baselines.LRUStep(c["state"], c["layers"], b)
  step_comparison("lru", model, params, xs[:, :c["steps"]],
                  {"hand_written": base}, pair, config, results)
  results["lru_carry_bytes_ratio"] = (
      baselines.carry_bytes(pair.carry_spec()) /
      baselines.carry_bytes(jax.eval_shape(base.init, params)))


def bench_wavenet(config, results):
  c, b = config["wavenet"], config["batch"]
  model = models.wavenet(c["channels"], c["layers"], c["out"])
  xs = jax.random.normal(jax.random.key(1), (b, c["length"], c["input"]))
  params = model.init(jax.random.key(0), xs)
  pair = to_step(model, xs, axis=1)
  base = baselines.WaveNetQueues(c["channels"], c["layers"], b)
  step_comparison("wavenet", model, params, xs[:, :c["steps"]],
                  {"hand_written": base}, pair,
                  config, results)
  results["wavenet_carry_bytes_ratio"] = (
      baselines.carry_bytes(pair.carry_spec()) /
      baselines.carry_bytes(jax.eval_shape(base.init, params)))


def greedy(rng, logits):
  del rng
  return jnp.argmax(logits, -1).astype(jnp.int32)


def naive_generator(model, length):
  """Jitted ``naive(params, seq, p, n) -> seq``: greedy generation by
  recomputation, re-running the training-mode model on the whole sequence
  padded to L (one compilation) for each of ``n`` tokens, one compiled
  loop."""
  def naive(params, seq, p, n):
    def body(i, seq):
      t = p + i - 1
      logits = model.apply(params, None, seq)
      token = greedy(None, jax.lax.dynamic_index_in_dim(logits, t, 1, False))
      return jax.lax.dynamic_update_slice(
          seq, token[:, None], (0, jnp.minimum(t + 1, length - 1)))
    return jax.lax.fori_loop(0, n, body, seq)
  return jax.jit(naive, static_argnums=3)


def bench_transformer(config, results):
  c, b = config["transformer"], config["batch"]
  length = c["length"]
  model = models.transformer(c["d_model"], c["heads"], c["layers"], length,
                             c["vocab"])
  tokens = jax.random.randint(jax.random.key(1), (b, length), 0, c["vocab"],
                              jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  pair = to_step(model, jax.ShapeDtypeStruct((b, length), jnp.int32), axis=1)
  base = baselines.TransformerCache(c["d_model"], c["heads"], c["layers"],
                                    length, b)
  # diagnostic: the same step with the cache in Haiku's [B, L, H, dh]
  # layout (the derived carry's layout)
  model_layout = baselines.TransformerCache(
      c["d_model"], c["heads"], c["layers"], length, b, head_major=False)
  step_comparison("transformer", model, params, tokens[:, :c["steps"]],
                  {"hand_written": base, "model_layout": model_layout}, pair,
                  config, results)

  derived_bytes = baselines.carry_bytes(pair.carry_spec())
  base_bytes = baselines.carry_bytes(jax.eval_shape(base.init, params))
  results["transformer_carry_bytes_ratio"] = derived_bytes / base_bytes
  derived_hlo = optimised_hlo(pair.functions.step, params, pair.init(params),
                              tokens[:, 0])
  base_hlo = optimised_hlo(base.step, params, base.init(params), tokens[:, 0])
  results["step_hlo_ratio"] = len(derived_hlo) / len(base_hlo)
  results["step_hlo_instructions_ratio"] = (derived_hlo.count("\n") /
                                            base_hlo.count("\n"))
  log(f"  transformer step HLO: {len(derived_hlo)} characters derived, "
      f"{len(base_hlo)} hand-written")
  results["transformer_carry_bytes_derived"] = derived_bytes
  log(f"  transformer carry: {derived_bytes} bytes derived, {base_bytes} "
      "hand-written")

  # Generation of L tokens from a 1-token prompt: pair.generate (one
  # compiled loop), the hand-written generate (one compiled loop), naive
  # recomputation (per-token time over naive_tokens tokens: padded to L,
  # each token costs the same).
  prompt = tokens[:, :1]
  base_generate = jax.jit(base.generate, static_argnums=2)
  derived_tokens = pair.generate(params, prompt, length, greedy)
  base_tokens = base_generate(params, prompt, length)
  naive = naive_generator(model, length)
  k = c["naive_tokens"]
  padded = jnp.zeros((b, length), jnp.int32).at[:, :1].set(prompt)
  naive_tokens = naive(params, padded, 1, k)[:, 1:1 + k]
  # The same greedy sequence, as far as float rounding keeps argmax ties
  # apart: compare the first tokens exactly, and the agreement overall.
  head = min(8, k)
  if not (np.array_equal(derived_tokens[:, :head], base_tokens[:, :head]) and
          np.array_equal(derived_tokens[:, :head], naive_tokens[:, :head])):
    raise AssertionError("transformer: greedy generation differs between "
                         "pair.generate, the hand-written generate and naive "
                         "recomputation")
  results["transformer_generate_agreement"] = float(
      np.mean(np.asarray(derived_tokens) == np.asarray(base_tokens)))

  layout_generate = jax.jit(model_layout.generate, static_argnums=2)
  t = interleaved({
      "derived": (lambda: None,
                  lambda _: pair.generate(params, prompt, length, greedy)),
      "hand_written": (lambda: None,
                       lambda _: base_generate(params, prompt, length)),
      "model_layout": (lambda: None,
                       lambda _: layout_generate(params, prompt, length)),
      "naive": (lambda: padded, lambda seq: naive(params, seq, 1, k)),
  }, repeats=c["generate_repeats"], warmup=1)
  per_token = {side: s / (k if side == "naive" else length)
               for side, s in t.items()}
  results["transformer_speedup_vs_recompute_T512"] = (
      per_token["naive"] / per_token["derived"])
  results["transformer_generate_ratio"] = (
      per_token["derived"] / per_token["hand_written"])
  results["transformer_generate_ratio_vs_model_layout"] = (
      per_token["derived"] / per_token["model_layout"])
  for side, s in per_token.items():
    results[f"transformer_generate_ms_per_token_{side}"] = 1e3 * s
  log(f"  generate {length} tokens, ms/token: " + ", ".join(
      f"{side} {1e3 * s:.2f}" for side, s in per_token.items()))
  latency = latency_by_position(model, pair, base, params, tokens, c)
  return model, pair, params, tokens, latency


def optimised_hlo(step, *args):
  """The compiled step's optimised HLO text without its metadata (source
  lines and op names, which say where an instruction came from, not what
  the program does)."""
  text = jax.jit(step).lower(*args).compile().as_text()
  return re.sub(r", metadata=\{[^}]*\}", "", text)


def bench_gqa(config, results):
  """Grouped-query attention (8 query heads over 2 key/value heads, the
  keys and values repeated with ``jnp.repeat`` in the training mode): the
  derived step and carry against a hand-written grouped cache."""
  c, b = config["gqa"], config["batch"]
  model = models.gqa_transformer(c["d_model"], c["heads"], c["kv_heads"],
                                 c["layers"], c["length"], c["vocab"])
  tokens = jax.random.randint(jax.random.key(2), (b, c["length"]), 0,
                              c["vocab"], jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  pair = to_step(model, jax.ShapeDtypeStruct((b, c["length"]), jnp.int32),
                 axis=1)
  base = baselines.GQACache(c["d_model"], c["heads"], c["kv_heads"],
                            c["layers"], c["length"], b)
  step_comparison("gqa", model, params, tokens[:, :c["steps"]],
                  {"hand_written": base}, pair, config, results)
  derived_bytes = baselines.carry_bytes(pair.carry_spec())
  base_bytes = baselines.carry_bytes(jax.eval_shape(base.init, params))
  results["gqa_carry_bytes_ratio"] = derived_bytes / base_bytes
  log(f"  gqa carry: {derived_bytes} bytes derived, {base_bytes} "
      "hand-written")


def latency_by_position(model, pair, base, params, tokens, c):
  """Per-token seconds at each position 0..L-1 for one jitted, donated
  derived step and hand-written step; for naive recomputation at a few
  positions (the training model on the exact prefix, compiled per length)."""
  length = c["length"]

  def per_position(init, step):
    step = jax.jit(step, donate_argnums=1)
    carry, y = step(params, init(params), tokens[:, 0])   # compile
    carry = init(params)
    times = []
    for i in range(length):
      start = time.perf_counter()
      carry, y = step(params, carry, tokens[:, i])
      jax.block_until_ready(y)
      times.append(time.perf_counter() - start)
    return np.array(times)
  derived = per_position(pair.init, pair.functions.step)
  hand_written = per_position(base.init, base.step)
  forward = jax.jit(lambda p, seq: model.apply(p, None, seq))
  naive = []
  for t in c["latency_positions"]:
    prefix = tokens[:, :t]
    jax.block_until_ready(forward(params, prefix))  # compile this length
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(forward(params, prefix))
      times.append(time.perf_counter() - start)
    naive.append(float(np.median(times)))
  return {"derived": derived, "hand_written": hand_written,
          "naive_positions": np.array(
      c["latency_positions"]) - 1, "naive": np.array(naive)}


def bench_conversion(config, results):
  """to_step + compiling the step against compiling the forward, for
  transformers of several depths (fresh models: no tracing cache helps)."""
  c = config["transformer"]
  spec = jax.ShapeDtypeStruct((1, c["length"]), jnp.int32)
  x = jax.ShapeDtypeStruct((1,), jnp.int32)

  def measure(n):
    gc.collect()  # the previous depth's garbage must not be collected here
    def build():
      return models.transformer(c["d_model"], c["heads"], n, c["length"],
                                c["vocab"])
    params = jax.eval_shape(build().init, jax.random.key(0), spec)
    model = build()
    forward_s, _ = seconds(lambda: jax.jit(
        lambda p, seq: model.apply(p, None, seq)).lower(params, spec).compile())
    model = build()
    convert_s, pair = seconds(lambda: to_step(model, spec, axis=1))
    compile_s, _ = seconds(lambda: jax.jit(pair.functions.step).lower(
        params, pair.carry_spec(), x).compile())
    base = baselines.TransformerCache(c["d_model"], c["heads"], n,
                                      c["length"], 1)
    base_s, _ = seconds(lambda: jax.jit(base.step).lower(
        params, jax.eval_shape(base.init, params), x).compile())
    # the training-mode forward on one token: what XLA needs to compile a
    # program of one-token matrix products, with no cache at all
    one_s, _ = seconds(lambda: jax.jit(
        lambda p, seq: model.apply(p, None, seq)).lower(
            params, jax.ShapeDtypeStruct((1, 1), jnp.int32)).compile())
    return convert_s, compile_s, forward_s, base_s, one_s

  samples = {n: [] for n in config["depths"]}
  for _ in range(config["convert_repeats"]):   # depths interleaved
    for n in config["depths"]:
      samples[n].append(measure(n))
  seconds_by_depth = {}
  for n in config["depths"]:
    convert_s, compile_s, forward_s, base_s, one_s = np.median(samples[n],
                                                               axis=0)
    results[f"convert_seconds_{n}_layers"] = convert_s
    results[f"compile_step_seconds_{n}_layers"] = compile_s
    results[f"compile_forward_seconds_{n}_layers"] = forward_s
    results[f"compile_hand_written_step_seconds_{n}_layers"] = base_s
    results[f"compile_forward_one_token_seconds_{n}_layers"] = one_s
    seconds_by_depth[n] = (convert_s, compile_s, forward_s, base_s, one_s)
    log(f"  {n} layers: convert {convert_s:.2f} s, compile step "
        f"{compile_s:.2f} s, compile forward {forward_s:.2f} s, compile "
        f"hand-written step {base_s:.2f} s, compile forward on one token "
        f"{one_s:.2f} s (medians of "
        f"{len(samples[n])}; all: {np.round(samples[n], 2).tolist()})")
  deepest = max(config["depths"])
  convert_s, compile_s, forward_s, base_s, one_s = seconds_by_depth[deepest]
  results["convert_compile_ratio_24_layers"] = (
      (convert_s + compile_s) / forward_s)
  # linear growth: (t_deepest / t_next) / (n_deepest / n_next) is ~1
  if len(config["depths"]) > 1:
    n_prev = sorted(config["depths"])[-2]
    results["convert_seconds_growth_vs_linear"] = (
        (convert_s / seconds_by_depth[n_prev][0]) / (deepest / n_prev))
  # reference: compiling the hand-written step / compiling the forward
  results["hand_written_compile_ratio_24_layers"] = base_s / forward_s
  results["one_token_forward_compile_ratio_24_layers"] = one_s / forward_s
  return seconds_by_depth


def bench_torch(config, results, pair, params, tokens):
  """TorchStepper against the same jitted, donated step called from JAX."""
  import torch
  from scanagram.adapters.torch import TorchStepper
  calls = config["torch_calls"]
  stepper = TorchStepper(pair, params)
  jax_step = jax.jit(lambda p, carry, x: pair.step(p, carry, x),
                     donate_argnums=1)
  xs_jax = [tokens[:, i] for i in range(calls)]
  xs_host = [np.asarray(x) for x in xs_jax]
  xs_torch = [torch.from_dlpack(x) for x in xs_jax]
  xs_block = torch.from_dlpack(tokens[:, :calls])

  want = np.asarray(baselines.scan_steps(pair.functions.step)(
      params, pair.init(params), tokens[:, :calls])[1])
  stepper.reset()
  got = np.stack([stepper(x).numpy() for x in xs_torch], 1)
  check_close("torch stepper", jnp.asarray(got), jnp.asarray(want))
  stepper.reset()
  check_close("torch stepper run", jnp.asarray(stepper.run(xs_block).numpy()),
              jnp.asarray(want))

  def jax_sequence(xs):
    def start():
      carry = pair.init(params)

      def call(i):
        nonlocal carry
        carry, y = jax_step(params, carry, xs[i])
        # y is consumed each call (as a generation loop does, and as a torch
        # tensor must be: TorchStepper hands over a ready tensor)
        y.block_until_ready()
      return call
    return start

  def torch_sequence():
    stepper.reset()
    return lambda i: stepper(xs_torch[i])

  per_call = interleaved_calls({
      "jax": jax_sequence(xs_jax),
      # x imported from host memory by the call, as TorchStepper imports a
      # torch tensor
      "jax host x": jax_sequence(xs_host),
      "torch": torch_sequence,
  }, calls=calls, repeats=config["call_repeats"], warmup=config["warmup"])
  # TorchStepper.run against the same compiled run called from JAX: what
  # the boundary costs a chunk of steps
  tokens_block = tokens[:, :calls]
  whole = interleaved({
      "calls": (stepper.reset, lambda _: [stepper(x) for x in xs_torch][-1]),
      "run": (stepper.reset, lambda _: stepper.run(xs_block)),
      "jax run": (lambda: stepper._fns.init(stepper._unscanned),
                  lambda carry: stepper._fns.run(stepper._unscanned, carry,
                                                 tokens_block)[1]),
  }, repeats=config["call_repeats"], warmup=config["warmup"])
  results["torch_run_ratio_vs_jax_run"] = whole["run"] / whole["jax run"]
  results["torch_step_ratio"] = per_call["torch"] / per_call["jax"]
  results["torch_run_speedup"] = whole["calls"] / whole["run"]
  results["jax_host_input_ratio"] = per_call["jax host x"] / per_call["jax"]
  results["torch_step_ratio_vs_host_input"] = (per_call["torch"] /
                                               per_call["jax host x"])
  log(f"  torch: {1e3 * per_call['torch']:.2f} ms/call TorchStepper, "
      f"{1e3 * per_call['jax']:.2f} ms/call JAX "
      f"({1e3 * per_call['jax host x']:.2f} with x from host memory); run of "
      f"{calls} steps {1e3 * whole['run']:.1f} ms, the same run from JAX "
      f"{1e3 * whole['jax run']:.1f} ms")


# -- blocks: extend, chunked prefill, ragged rows -----------------------------
def copied(tree):
  """A fresh copy of every array (a carry to donate, the original kept)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def bench_extend(config, results, model, pair, params, tokens):
  """``extend`` of k tokens against ``step``, and a prompt prefilled in
  chunks against one prefill, on the bench transformer's functions (no
  rows). Each call is jitted with the carry donated; a donated carry is a
  fresh copy made untimed (``interleaved``'s setup)."""
  c = config["transformer"]
  fns = pair.functions
  at, k, chunk = c["extend_at"], c["extend_block"], c["chunk"]
  length = c["length"]
  want = model.apply(params, None, tokens)
  prefill = jax.jit(lambda p, xs: fns.prefill(p, xs))
  extend = jax.jit(lambda p, carry, xs: fns.extend(p, carry, xs),
                   donate_argnums=1)
  step = jax.jit(lambda p, carry, x: fns.step(p, carry, x), donate_argnums=1)

  # extend of k tokens / step, both from the carry at position `at`
  carry_at, _ = prefill(params, tokens[:, :at])
  block, element = tokens[:, at:at + k], tokens[:, at]
  _, ys = extend(params, copied(carry_at), block)
  check_close("transformer extend", ys, want[:, at:at + k])
  _, y = step(params, copied(carry_at), element)
  check_close("transformer step after prefill", y, want[:, at])
  t = interleaved({
      "extend": (lambda: copied(carry_at),
                 lambda carry: extend(params, carry, block)),
      "step": (lambda: copied(carry_at),
               lambda carry: step(params, carry, element)),
  }, repeats=c["block_repeats"], warmup=config["warmup"])
  results[f"extend{k}_over_step"] = t["extend"] / t["step"]
  results[f"extend{k}_ms_at_{at}"] = 1e3 * t["extend"]
  results[f"step_ms_at_{at}"] = 1e3 * t["step"]
  log(f"  extend of {k} at {at}: {1e3 * t['extend']:.2f} ms, step "
      f"{1e3 * t['step']:.2f} ms: ratio {t['extend'] / t['step']:.2f}")

  # a prompt of L tokens: chunks (a prefill, then extends) / one prefill
  chunks = [tokens[:, i:i + chunk] for i in range(0, length, chunk)]

  def chunked(_):
    carry, y = prefill(params, chunks[0])
    ys = [y]
    for block in chunks[1:]:
      carry, y = extend(params, carry, block)
      ys.append(y)
    return carry, ys
  whole = lambda _: prefill(params, tokens)  # noqa: E731
  check_close("transformer chunked prefill",
              jnp.concatenate(chunked(None)[1], 1), want)
  check_close("transformer prefill", whole(None)[1], want)
  t = interleaved({"chunked": (lambda: None, chunked),
                   "whole": (lambda: None, whole)},
                  repeats=c["block_repeats"], warmup=config["warmup"])
  results["chunked_prefill_ratio"] = t["chunked"] / t["whole"]
  results[f"chunked_prefill_ms_{len(chunks)}x{chunk}"] = 1e3 * t["chunked"]
  results[f"prefill_ms_{length}"] = 1e3 * t["whole"]
  log(f"  prompt of {length}: {len(chunks)} chunks of {chunk} "
      f"{1e3 * t['chunked']:.1f} ms, one prefill {1e3 * t['whole']:.1f} ms: "
      f"ratio {t['chunked'] / t['whole']:.2f}")


def bench_ragged(config, results, model, pair, params, tokens):
  """``pair.generate`` from prompts of different lengths per row (the
  conversion with rows, ``to_step(..., batch_axis=0)``, ``lengths=``)
  against the same from prompts all of the longest length (the conversion
  without rows). Per-token time is (time of S2 steps - time of S1 steps) /
  (S2 - S1), so that the prefill cancels."""
  c, b = config["transformer"], config["batch"]
  p = c["ragged_prompt"]
  s1, s2 = c["ragged_steps"]
  lengths = jnp.asarray(np.random.default_rng(0).integers(1, p + 1, b),
                        jnp.int32)
  full = jnp.full((b,), p, jnp.int32)
  prompt = tokens[:, :p]
  fun = lambda params, xs: model.apply(params, None, xs)  # noqa: E731
  rows = to_step(model, jax.ShapeDtypeStruct(tokens.shape, tokens.dtype),
                 axis=1, batch_axis=0)
  runs = {"uniform": lambda n: pair.generate(params, prompt, n, greedy),
          "ragged": lambda n: rows.generate(params, prompt, n, greedy,
                                            lengths=lengths),
          "rows_full": lambda n: rows.generate(params, prompt, n, greedy,
                                               lengths=full)}

  # checks: the rows at full length generate what the uniform conversion
  # does; each ragged row generates what the training model predicts from
  # that row's own prompt and the tokens generated so far (teacher forcing)
  head = min(8, s1)
  got = {side: np.asarray(run(s1)) for side, run in runs.items()}
  if not np.array_equal(got["rows_full"][:, :head],
                        got["uniform"][:, :head]):
    raise AssertionError("ragged generate: rows at full length differ from "
                         "the uniform conversion")
  ends = np.asarray(lengths)
  seqs = np.zeros((b, p + s1), np.int32)
  for r, e in enumerate(ends):
    seqs[r, :e] = np.asarray(prompt[r, :e])
    seqs[r, e:e + s1] = got["ragged"][r]
  logits = jax.jit(fun)(params, jnp.asarray(seqs))
  for r, e in enumerate(ends):
    predicted = np.asarray(greedy(None, logits[r, e - 1:e - 1 + head]))
    if not np.array_equal(predicted, got["ragged"][r, :head]):
      raise AssertionError(f"ragged generate: row {r} (prompt of {e}) "
                           "differs from the training model")

  t = interleaved({f"{side} {n}": (lambda: None, lambda _, run=run, n=n:
                                   run(n))
                   for side, run in runs.items() for n in (s1, s2)},
                  repeats=c["ragged_repeats"], warmup=config["warmup"])
  per_token = {side: (t[f"{side} {s2}"] - t[f"{side} {s1}"]) / (s2 - s1)
               for side in runs}
  results["ragged_generate_ratio"] = per_token["ragged"] / per_token["uniform"]
  results["ragged_generate_ratio_same_conversion"] = (
      per_token["ragged"] / per_token["rows_full"])
  results["rows_generate_ratio_vs_uniform"] = (
      per_token["rows_full"] / per_token["uniform"])
  for side, s in per_token.items():
    results[f"generate_ms_per_token_{side}"] = 1e3 * s
  log(f"  generate, ms/token (prompts {p} or ragged 1..{p}, {s2} - {s1} "
      "steps): " + ", ".join(f"{side} {1e3 * s:.3f}"
                             for side, s in per_token.items()))


def plot(latency, seconds_by_depth, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  derived = latency["derived"]
  left.plot(np.arange(len(derived)), 1e3 * derived, lw=0.8,
            label="derived step (one call per token)")
  left.plot(np.arange(len(derived)), 1e3 * latency["hand_written"], lw=0.8,
            label="hand-written KV-cache step")
  left.plot(latency["naive_positions"], 1e3 * latency["naive"], "o-",
            label="naive recomputation on the prefix")
  left.set(xlabel="position", ylabel="ms per token", yscale="log",
           title="transformer: per-token latency")
  left.legend()
  depths = sorted(seconds_by_depth)
  for i, label in enumerate(["to_step (convert)", "compile derived step",
                             "compile training forward",
                             "compile hand-written step"]):
    right.plot(depths, [seconds_by_depth[n][i] for n in depths], "o-",
               label=label)
  right.set(xlabel="layers", ylabel="seconds", title="conversion time "
            "against depth")
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def table(results):
  rows = []
  for key, value in results.items():
    target = TARGETS.get(key)
    if target is None:
      verdict, goal = "", ""
    else:
      op, bound = target
      met = value <= bound if op == "<=" else value >= bound
      verdict, goal = ("met" if met else "MISSED"), f"{op} {bound:g}"
    rows.append((key, f"{value:.4g}", goal, verdict))
  widths = [max(len(r[i]) for r in rows + [("figure", "value", "target",
                                             "")]) for i in range(4)]
  lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(
      ("figure", "value", "target", ""), widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
            for r in rows]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, a few repetitions (seconds)")
  parser.add_argument("--out", default="out", help="output directory")
  args = parser.parse_args(argv)
  config = SMOKE if args.smoke else FULL
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  results = {}
  log(f"jax {jax.__version__} on {jax.devices()[0].platform}, "
      f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
      + (" (smoke sizes)" if args.smoke else ""))
  log("lstm ...")
  bench_lstm(config, results)
  log("wavenet ...")
  bench_wavenet(config, results)
  log("lru ...")
  bench_lru(config, results)
  log("transformer ...")
  model, pair, params, tokens, latency = bench_transformer(config, results)
  log("extend and chunked prefill ...")
  bench_extend(config, results, model, pair, params, tokens)
  log("ragged rows ...")
  bench_ragged(config, results, model, pair, params, tokens)
  log("grouped-query attention ...")
  bench_gqa(config, results)
  log("encoder-decoder ...")
  encdec.bench_encdec(results, encdec.SMOKE if config is SMOKE else None)
  log("block-wise attention ...")
  blockwise.bench_blockwise(
      results, blockwise.SMOKE if config is SMOKE else None, log)
  log("flax ...")
  flax_decode.bench_flax(results,
                         flax_decode.SMOKE if config is SMOKE else None)
  log("sharded (2x4 mesh of 8 host devices, a fresh process) ...")
  sharded.bench_sharded(results, sharded.SMOKE if config is SMOKE else None)
  log("torch ...")
  bench_torch(config, results, pair, params, tokens)
  log("conversion ...")
  seconds_by_depth = bench_conversion(config, results)
  log("conversion at L=32768 ...")
  long_context.bench_long_context(
      results, ("window",) if config is SMOKE else long_context.STYLES)
  plot(latency, seconds_by_depth, out / "bench.png")
  results["cpu_count"] = os.cpu_count()
  results["load_average_1min"] = os.getloadavg()[0]
  results["smoke"] = int(args.smoke)
  results["total_seconds"] = time.perf_counter() - start
  ordered = {k: results[k] for k in required_keys(config)}
  ordered.update({k: v for k, v in results.items() if k not in ordered})
  (out / "bench.json").write_text(json.dumps(ordered, indent=1) + "\n")
  log(table(ordered))
  log(f"wrote {out / 'bench.json'} and {out / 'bench.png'} "
      f"({ordered['total_seconds']:.0f} s)")
  return ordered


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
