"""Shared checks: the contract every rule must meet."""
import os

# Tests compile thousands of small programs: XLA's backend optimisations
# would cost more than they save (the benchmarks run fully optimised).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax import lax  # noqa: E402

import scanagram  # noqa: E402

jax.config.update("jax_enable_x64", False)


def random_like(example, seed=0):
  """Random arrays with ``example``'s structure, shapes and dtypes."""
  leaves, tree = jax.tree.flatten(example)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for k, x in zip(keys, leaves):
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.floating):
      out.append(jax.random.normal(k, x.shape, dtype))
    elif dtype == jnp.bool_:
      out.append(jax.random.bernoulli(k, 0.5, x.shape))
    else:
      out.append(jax.random.randint(k, x.shape, 0, 5).astype(dtype))
  return jax.tree.unflatten(tree, out)


def _tol(dtype):
  dtype = jnp.dtype(dtype)
  if dtype in (jnp.bfloat16, jnp.float16):
    return 2e-2
  if jnp.issubdtype(dtype, jnp.inexact):
    return 2e-5
  return 0


def assert_trees_close(got, want, tol=None):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g, np.float64) if np.asarray(g).dtype != bool else g,
      np.asarray(w, np.float64) if np.asarray(w).dtype != bool else w,
      rtol=_tol(w.dtype) if tol is None else tol,
      atol=_tol(w.dtype) if tol is None else tol), got, want)


def blocks(start, stop, sizes=(1, 2, 5)):
  """``(start, k)`` pairs from ``start`` to ``stop``: blocks of ``sizes``,
  then the rest, the last one clipped."""
  out = []
  for k in tuple(sizes) + (None,):
    if start >= stop:
      break
    k = stop - start if k is None else min(k, stop - start)
    out.append((start, k))
    start += k
  return out


def causal_mask(n):
  """``[n, n]``: query i keeps keys j <= i."""
  return jnp.tril(jnp.ones((n, n), bool))


def window_mask(w):
  """``mask(n)``: query i keeps keys i - w < j <= i."""
  def mask(n):
    i, j = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    return (j <= i) & (j > i - w)
  return mask


def check_scan(fun, xs, prefill_lengths=None, tol=None):
  """One ``scanagram.to_step(fun, xs)`` (time axis 0 of ``xs`` and of the
  outputs) meets the contract:

  * stepping ``init`` through ``xs`` (the jitted step, element by element,
    as ``lax.scan`` of it would) equals ``fun(xs)``;
  * after a prefill of every length p in ``prefill_lengths`` (default: 0, 1,
    L // 2, L) the prefill's outputs equal ``fun(xs)[:p]``, its position is p,
    and stepping the rest equals ``fun(xs)[p:]``;
  * from that prefill, ``extend`` by blocks of 1, 2, 5 elements and then the
    rest (each clipped at L) gives, block by block, ``fun(xs)`` at those
    positions, and ends at position L with the carry ``lax.scan`` of the step
    ends with.

  The same converted functions serve every p, so each block size compiles
  once per call. Returns ``(step, init)`` as ``scanagram.as_scan`` does.
  """
  def part(tree, start, stop):
    return jax.tree.map(lambda x: x[start:stop], tree)

  length = jax.tree.leaves(xs)[0].shape[0]
  want = fun(xs)
  fns = scanagram.to_step(fun, xs)
  step, init = fns.step, fns.init()
  # one compiled step serves every prefill length (a lax.scan over each
  # remaining length would compile once per length)
  jitted = jax.jit(step)

  def steps(carry, start, stop):
    ys = []
    for t in range(start, stop):
      carry, y = jitted(carry, jax.tree.map(lambda x: x[t], xs))
      ys.append(y)
    if not ys:
      return carry, part(want, 0, 0)
    return carry, jax.tree.map(lambda *y: jnp.stack(y), *ys)

  assert int(fns.positions(init)) == 0
  end, got = steps(init, 0, length)
  assert_trees_close(got, want, tol)
  assert int(fns.positions(end)) == length
  if prefill_lengths is None:
    prefill_lengths = sorted({0, 1, length // 2, length})
  for p in prefill_lengths:
    carry, out_prefill = fns.prefill(part(xs, 0, p))
    assert_trees_close(out_prefill, part(want, 0, p), tol)
    assert int(fns.positions(carry)) == p
    if p == length:
      continue
    end, got = steps(carry, p, length)
    assert_trees_close(got, part(want, p, length), tol)
    for start, k in blocks(p, length):
      carry, ys = fns.extend(carry, part(xs, start, start + k))
      try:
        assert_trees_close(ys, part(want, start, start + k), tol)
        assert int(fns.positions(carry)) == start + k
      except AssertionError as e:
        raise AssertionError(f"extend by {k} at position {start} (after a "
                             f"prefill of {p}): {e}") from None
    assert_trees_close(carry, end, tol)
  return step, init


def check_refused(fun, xs, *fragments):
  """Conversion raises ScanConversionError whose message contains every
  fragment and this test file's name (the user's source line)."""
  with pytest.raises(scanagram.ScanConversionError) as info:
    scanagram.as_scan(fun, xs)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  import inspect
  caller = inspect.stack()[1].filename
  assert os.path.basename(caller) in message, message
  return message
