"""Converting attention at long context: ``to_step`` time and memory at
L = 32768, where a mask is an L×L array that conversion must not build.

Each model is a 2-layer, 4-head causal transformer (batch 8, model dim 64)
in one mask style: ``jnp.tril(jnp.ones((L, L), bool))``, an ``arange``
comparison, ``hk.MultiHeadAttention`` with a ``[1, 1, L, L]`` mask, and a
sliding window ``(i >= j) & (i - j < w)`` (which must get a ring of w keys).
Only the conversion is measured (``scanagram.to_step`` on shape structs:
no parameter or input of length L is allocated), each in a fresh Python
process so that earlier allocations do not hide its peak.

Usage: python -m benchmarks.long_context [L]

JSON keys added by :func:`bench_long_context`:
  convert_seconds_L32768, convert_peak_mib_L32768: the worst over the mask
    styles (targets <= 5 s and <= 500 MiB); and per style
    convert_seconds_L32768_<style>, convert_peak_mib_L32768_<style>.
"""
import json
import os
import subprocess
import sys

LENGTH = 32768
BATCH, HEADS, D_MODEL, LAYERS, VOCAB, WINDOW = 8, 4, 64, 2, 256, 128
STYLES = ("tril", "arange", "haiku", "window")


def model(style: str, length: int, window: int = WINDOW):
  """``hk.Transformed``: tokens [B, T] -> logits [B, T, VOCAB]."""
  import haiku as hk
  import jax
  import jax.numpy as jnp

  def mask():
    if style == "tril":
      return jnp.tril(jnp.ones((length, length), bool))
    i, j = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
    if style == "window":
      return (i >= j) & (i - j < window)
    return i >= j

  def attention(x, name):
    b, t, _ = x.shape
    dh = D_MODEL // HEADS
    q, k, v = (hk.Linear(D_MODEL, name=f"{name}_{n}")(x).reshape(
        b, t, HEADS, dh) for n in "qkv")
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(float(dh))
    logits = jnp.where(mask(), logits, -1e30)
    out = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), v)
    return hk.Linear(D_MODEL, name=f"{name}_out")(out.reshape(b, t, D_MODEL))

  def forward(tokens):
    h = hk.Embed(VOCAB, D_MODEL, name="embed")(tokens)
    for i in range(LAYERS):
      a = hk.LayerNorm(-1, True, True, name=f"ln_attn_{i}")(h)
      if style == "haiku":
        m = jnp.tril(jnp.ones((1, 1, length, length), bool))
        h = h + hk.MultiHeadAttention(
            HEADS, D_MODEL // HEADS,
            w_init=hk.initializers.VarianceScaling(1.0),
            name=f"attn_{i}")(a, a, a, mask=m)
      else:
        h = h + attention(a, f"attn_{i}")
      m = hk.LayerNorm(-1, True, True, name=f"ln_mlp_{i}")(h)
      h = h + hk.nets.MLP([4 * D_MODEL, D_MODEL], activation=jax.nn.gelu,
                          name=f"mlp_{i}")(m)
    return hk.Linear(VOCAB, name="unembed")(h)
  return hk.transform(forward)


def convert(style: str, length: int, batch: int = BATCH):
  """``(step functions, params spec, tokens spec)``: ``to_step`` on shape
  structs of the parameters and tokens (nothing of length L allocated)."""
  import jax
  import jax.numpy as jnp
  import scanagram

  net = model(style, length)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(net.init, jax.random.key(0), tokens)
  fns = scanagram.to_step(lambda p, t: net.apply(p, None, t), params, tokens,
                          in_axes=(None, 1), out_axes=1)
  return fns, params, tokens


def _rss_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return None


def measure(style: str, length: int = LENGTH) -> dict:
  """In this process: seconds and peak RSS growth (MiB) of ``to_step``."""
  import resource
  import time
  import jax

  # imports and JAX's first use are not the conversion's: warm up on a
  # tiny model, then drop the caches it filled
  convert(style, 16, batch=1)
  jax.clear_caches()
  before = _rss_kib("VmRSS")
  try:  # reset the high-water mark to now, where Linux allows it
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    reset = True
  except OSError:
    reset = False
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  fns, _, _ = convert(style, length)
  seconds = time.perf_counter() - start
  peak = _rss_kib("VmHWM") if reset else resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss
  carry = jax.tree.leaves(fns.carry_spec())
  return {"seconds": seconds, "peak_mib": max(0, peak - before) / 1024,
          "carry_shapes": [list(x.shape) for x in carry]}


def measure_in_subprocess(style: str, length: int = LENGTH) -> dict:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ("import json, sys; from benchmarks.long_context import measure; "
          f"print(json.dumps(measure({style!r}, {length})))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                       capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_long_context(results: dict, styles=STYLES) -> None:
  """Adds convert_seconds_L32768 and convert_peak_mib_L32768 (the worst
  of ``styles``) and the per-style figures to ``results``."""
  worst_s, worst_mib = 0.0, 0.0
  for style in styles:
    r = measure_in_subprocess(style, LENGTH)
    results[f"convert_seconds_L{LENGTH}_{style}"] = round(r["seconds"], 3)
    results[f"convert_peak_mib_L{LENGTH}_{style}"] = round(r["peak_mib"], 1)
    if style == "window" and (
        any(LENGTH in s for s in r["carry_shapes"]) or
        not any(WINDOW in s for s in r["carry_shapes"])):
      raise AssertionError(f"the window model's carry {r['carry_shapes']} "
                           f"is not rings of {WINDOW} keys")
    worst_s = max(worst_s, r["seconds"])
    worst_mib = max(worst_mib, r["peak_mib"])
  results[f"convert_seconds_L{LENGTH}"] = round(worst_s, 3)
  results[f"convert_peak_mib_L{LENGTH}"] = round(worst_mib, 1)


if __name__ == "__main__":
  if len(sys.argv) > 1:
    LENGTH = int(sys.argv[1])
  figures = {}
  bench_long_context(figures)
  print(json.dumps(figures, indent=1))
