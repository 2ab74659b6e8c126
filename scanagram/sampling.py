"""Samplers for :meth:`scanagram.StepPair.generate` and ``stream``.

A sampler is ``sample(rng, logits) -> ids``: ``logits`` ``[..., V]`` floats,
``ids`` int32 ``[...]``. ``greedy`` is one; ``temperature(t)``,
``top_k(k)`` and ``top_p(p)`` make one. Samplers with equal arguments are
equal (and hash alike), so ``generate`` reuses its compiled loop for them.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from scanagram import sampling
  >>> logits = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
  >>> sampling.greedy(None, logits).tolist()
  [1]
  >>> sampling.top_k(1)(jax.random.key(0), logits).tolist()
  [1]
  >>> sampling.top_p(0.5) == sampling.top_p(0.5)
  True
"""
import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["greedy", "temperature", "top_k", "top_p"]


def greedy(rng, logits):
  """The most likely token (the first of equal ones); ``rng`` is unused."""
  del rng
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def temperature(t: float):
  """Samples from ``softmax(logits / t)``; ``t > 0`` (small: near greedy)."""
  return _Temperature(_temperature(t))


def top_k(k: int, temperature: float = 1.0):
  """Samples among the ``k`` most likely tokens (all of them when k >= V),
  from ``softmax(logits / temperature)`` restricted to them."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"top_k: k must be an int >= 1; got {k!r}")
  return _TopK(int(k), _temperature(temperature))


def top_p(p: float, temperature: float = 1.0):
  """Nucleus sampling: samples among the smallest set of most likely tokens
  whose probability (of ``softmax(logits / temperature)``) sums to >= p,
  always the most likely one; ``0 < p <= 1``."""
  if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (
      0 < p <= 1):
    raise ValueError(f"top_p: p must be a number in (0, 1]; got {p!r}")
  return _TopP(float(p), _temperature(temperature))


def _temperature(t):
  if isinstance(t, bool) or not isinstance(t, numbers.Real) or not (
      math.isfinite(t) and t > 0):
    raise ValueError(f"temperature must be a finite number > 0; got {t!r}")
  return float(t)


def _scaled(logits, t):
  """``logits / t`` in at least float32 (bfloat16 logits lose the tail)."""
  logits = jnp.asarray(logits)
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / t


@dataclasses.dataclass(frozen=True)
class _Temperature:
  t: float

  def __call__(self, rng, logits):
    return jax.random.categorical(rng, _scaled(logits, self.t),
                                  axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _TopK:
  k: int
  t: float

  def __call__(self, rng, logits):
    k = min(self.k, logits.shape[-1])
    values, ids = lax.top_k(_scaled(logits, self.t), k)
    choice = jax.random.categorical(rng, values, axis=-1)
    return jnp.take_along_axis(ids, choice[..., None],
                               axis=-1)[..., 0].astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _TopP:
  p: float
  t: float

  def __call__(self, rng, logits):
    scaled = _scaled(logits, self.t)
    if self.p >= 1:                       # every token: plain sampling
      return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    values, ids = lax.top_k(scaled, scaled.shape[-1])    # sorted, best first
    probs = jax.nn.softmax(values, axis=-1)
    # keep a token when the mass before it is < p: the smallest prefix whose
    # mass reaches p, and always the first (mass before it: exactly 0)
    keep = jnp.cumsum(probs, axis=-1) - probs < self.p
    choice = jax.random.categorical(
        rng, jnp.where(keep, values, -jnp.inf), axis=-1)
    return jnp.take_along_axis(ids, choice[..., None],
                               axis=-1)[..., 0].astype(jnp.int32)
