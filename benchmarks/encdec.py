"""Encoder-decoder: the derived step against a hand-written one that caches
the cross-attention keys and values.

The model (plain JAX, :func:`model`): an encoder of ``layers`` layers of
self-attention over an unscanned source ``src: [B, S, D]`` and an MLP; a
decoder of ``layers`` layers of causal self-attention, cross-attention to
the encoder's output and an MLP, over a target ``tgt: [B, L, D]`` scanned
along axis 1. ``scanagram.to_step`` converts it with the source and the
parameters unscanned: its ``init`` runs the encoder and projects the
cross-attention keys and values once, and the step reads them from the
carry. :class:`HandWritten` is the same decoder step as an expert writes
it: the self-attention caches and the cross-attention keys and values in
``[B, H, *, dh]``, the caches written with ``dynamic_update_slice``.

Both sides are checked against the training mode, then N steps of each run
in one jitted ``lax.scan`` (carry donated), interleaved, medians.

JSON key: ``encdec_step_ratio``: derived / hand-written per-step time
(target <= 1.10); diagnostics ``encdec_step_ms_derived``,
``encdec_step_ms_hand_written``, ``encdec_carry_bytes_ratio``.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram
from benchmarks.timing import interleaved

FULL = dict(batch=8, source=512, length=256, d_model=256, heads=4, layers=2,
            steps=64, repeats=31, warmup=1)
SMOKE = dict(batch=2, source=8, length=8, d_model=16, heads=2, layers=2,
             steps=6, repeats=2, warmup=1)


# -- the model -----------------------------------------------------------------
def init_params(key, d, layers):
  keys = iter(jax.random.split(key, 64 * layers))

  def dense(n_in, n_out):
    return {"w": jax.random.normal(next(keys), (n_in, n_out)) / np.sqrt(n_in),
            "b": 0.1 * jax.random.normal(next(keys), (n_out,))}

  def attention():
    return {name: dense(d, d) for name in ("q", "k", "v", "o")}

  def norm():
    return {"scale": 1 + 0.1 * jax.random.normal(next(keys), (d,)),
            "offset": 0.1 * jax.random.normal(next(keys), (d,))}

  def mlp():
    return {"up": dense(d, 4 * d), "down": dense(4 * d, d)}
  encoder = [{"norm_attn": norm(), "attn": attention(), "norm_mlp": norm(),
              "mlp": mlp()} for _ in range(layers)]
  decoder = [{"norm_self": norm(), "self": attention(), "norm_cross": norm(),
              "cross": attention(), "norm_mlp": norm(), "mlp": mlp()}
             for _ in range(layers)]
  return {"encoder": encoder, "decoder": decoder, "out_norm": norm()}


def _linear(p, x):
  return x @ p["w"] + p["b"]


def _layer_norm(p, x):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["offset"]


def _mlp(p, x):
  return _linear(p["down"], jax.nn.gelu(_linear(p["up"], x)))


def _attention(p, heads, x, context, mask=None):
  """``x: [B, T, D]`` attends to ``context: [B, S, D]``."""
  b, t, d = x.shape
  dh = d // heads
  q = _linear(p["q"], x).reshape(b, t, heads, dh)
  k = _linear(p["k"], context).reshape(b, -1, heads, dh)
  v = _linear(p["v"], context).reshape(b, -1, heads, dh)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.float32(np.sqrt(dh))
  if mask is not None:
    logits = jnp.where(mask, logits, -1e30)
  weights = jax.nn.softmax(logits, -1)
  out = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, d)
  return _linear(p["o"], out)


def encode(params, heads, src):
  h = src
  for p in params["encoder"]:
    a = _layer_norm(p["norm_attn"], h)
    h = h + _attention(p["attn"], heads, a, a)
    h = h + _mlp(p["mlp"], _layer_norm(p["norm_mlp"], h))
  return h


def model(heads):
  """``f(params, src, tgt) -> [B, L, D]``: the training mode."""
  def f(params, src, tgt):
    memory = encode(params, heads, src)
    n = tgt.shape[1]
    causal = jnp.tril(jnp.ones((n, n), bool))
    h = tgt
    for p in params["decoder"]:
      a = _layer_norm(p["norm_self"], h)
      h = h + _attention(p["self"], heads, a, a, causal)
      h = h + _attention(p["cross"], heads, _layer_norm(p["norm_cross"], h),
                         memory)
      h = h + _mlp(p["mlp"], _layer_norm(p["norm_mlp"], h))
    return _layer_norm(params["out_norm"], h)
  return f


# -- the hand-written step -----------------------------------------------------
class HandWritten:
  """The decoder step with cached cross-attention keys and values.

  Carry: ``{"k", "v": [per layer] [B, H, L, dh] self-attention caches,
  "ck", "cv": [per layer] [B, H, S, dh] cross-attention keys and values,
  "t": int32}``. ``init(params, src)`` runs the encoder and projects the
  cross-attention keys and values once; ``step(params, carry, x)`` takes
  ``x: [B, D]``."""

  def __init__(self, heads, length):
    self.heads, self.length = heads, length

  def _split(self, x):   # [B, S, D] -> [B, H, S, dh]
    b, s, d = x.shape
    return x.reshape(b, s, self.heads, d // self.heads).transpose(0, 2, 1, 3)

  def init(self, params, src):
    memory = encode(params, self.heads, src)
    b, _, d = src.shape
    zeros = jnp.zeros((b, self.heads, self.length, d // self.heads))
    layers = params["decoder"]
    return {"k": [zeros] * len(layers), "v": [zeros] * len(layers),
            "ck": [self._split(_linear(p["cross"]["k"], memory))
                   for p in layers],
            "cv": [self._split(_linear(p["cross"]["v"], memory))
                   for p in layers],
            "t": jnp.zeros((), jnp.int32)}

  def step(self, params, carry, x):
    t = carry["t"]
    b, d = x.shape
    hh, dh = self.heads, d // self.heads
    scale = np.float32(np.sqrt(dh))
    visible = jnp.arange(self.length) <= t
    h, ks, vs = x, [], []
    for i, p in enumerate(params["decoder"]):
      a = _layer_norm(p["norm_self"], h)
      q = _linear(p["self"]["q"], a).reshape(b, hh, dh)
      k = _linear(p["self"]["k"], a).reshape(b, hh, 1, dh)
      v = _linear(p["self"]["v"], a).reshape(b, hh, 1, dh)
      k_cache = lax.dynamic_update_slice(carry["k"][i], k, (0, 0, t, 0))
      v_cache = lax.dynamic_update_slice(carry["v"][i], v, (0, 0, t, 0))
      ks.append(k_cache)
      vs.append(v_cache)
      logits = jnp.einsum("bhd,bhTd->bhT", q, k_cache) / scale
      weights = jax.nn.softmax(jnp.where(visible, logits, -1e30), -1)
      out = jnp.einsum("bhT,bhTd->bhd", weights, v_cache).reshape(b, d)
      h = h + _linear(p["self"]["o"], out)
      c = _linear(p["cross"]["q"], _layer_norm(p["norm_cross"], h))
      logits = jnp.einsum("bhd,bhsd->bhs", c.reshape(b, hh, dh),
                          carry["ck"][i]) / scale
      weights = jax.nn.softmax(logits, -1)
      out = jnp.einsum("bhs,bhsd->bhd", weights, carry["cv"][i])
      h = h + _linear(p["cross"]["o"], out.reshape(b, d))
      h = h + _mlp(p["mlp"], _layer_norm(p["norm_mlp"], h))
    y = _layer_norm(params["out_norm"], h)
    return dict(carry, k=ks, v=vs, t=t + 1), y


# -- the comparison ------------------------------------------------------------
def _scan_steps(step):
  """Jitted ``run(params, src, carry, xs) -> (carry, ys)``: ``step`` over
  ``xs: [B, N, D]`` in one ``lax.scan``, the carry donated."""
  def run(params, src, carry, xs):
    carry, ys = lax.scan(lambda c, x: step(params, src, c, x), carry,
                         jnp.moveaxis(xs, 1, 0))
    return carry, jnp.moveaxis(ys, 0, 1)
  return jax.jit(run, donate_argnums=2)


def _carry_bytes(tree):
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def bench_encdec(results: dict, config=None) -> None:
  """Adds ``encdec_step_ratio`` (and diagnostics) to ``results``."""
  c = FULL if config is None else config
  b, s, n, d = c["batch"], c["source"], c["length"], c["d_model"]
  params = init_params(jax.random.key(0), d, c["layers"])
  src = jax.random.normal(jax.random.key(1), (b, s, d))
  tgt = jax.random.normal(jax.random.key(2), (b, n, d))
  f = model(c["heads"])
  fns = scanagram.to_step(f, params, src, tgt, in_axes=(None, None, 1),
                          out_axes=1)
  hand = HandWritten(c["heads"], n)
  hand_init = jax.jit(hand.init)
  runs = {
      "derived": (lambda: fns.init(params, src), _scan_steps(fns.step)),
      "hand_written": (lambda: hand_init(params, src),
                       _scan_steps(lambda p, _, carry, x:
                                   hand.step(p, carry, x))),
  }
  xs = tgt[:, :c["steps"]]
  want = jax.jit(f)(params, src, tgt)[:, :c["steps"]]
  for side, (init, run) in runs.items():
    _, ys = run(params, src, init(), xs)
    err = float(jnp.max(jnp.abs(ys - want)))
    if not np.allclose(np.asarray(ys), np.asarray(want), atol=1e-4,
                       rtol=1e-4):
      raise AssertionError(f"encdec {side} step: outputs differ from the "
                           f"training mode by {err}")
  t = interleaved({side: (init, lambda carry, run=run: run(params, src,
                                                            carry, xs))
                   for side, (init, run) in runs.items()},
                  repeats=c["repeats"], warmup=c["warmup"])
  steps = xs.shape[1]
  results["encdec_step_ratio"] = t["derived"] / t["hand_written"]
  results["encdec_step_ms_derived"] = 1e3 * t["derived"] / steps
  results["encdec_step_ms_hand_written"] = 1e3 * t["hand_written"] / steps
  results["encdec_carry_bytes_ratio"] = (
      _carry_bytes(fns.carry_spec()) /
      _carry_bytes(jax.eval_shape(lambda: hand.init(params, src))))


if __name__ == "__main__":
  import sys
  out = {}
  bench_encdec(out, SMOKE if "--smoke" in sys.argv else FULL)
  for key, value in out.items():
    print(f"{key}: {value:.4g}")
