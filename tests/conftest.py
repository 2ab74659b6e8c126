"""Shared checks: the contract every rule must meet."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
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
  if jnp.issubdtype(dtype, jnp.floating):
    return 2e-5
  return 0


def assert_trees_close(got, want, tol=None):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      np.asarray(g, np.float64) if np.asarray(g).dtype != bool else g,
      np.asarray(w, np.float64) if np.asarray(w).dtype != bool else w,
      rtol=_tol(w.dtype) if tol is None else tol,
      atol=_tol(w.dtype) if tol is None else tol), got, want)


def check_scan(fun, xs, prefill_lengths=None, tol=None):
  """``lax.scan(step, init, xs)`` equals ``fun(xs)``, also after a prefill of
  every length in ``prefill_lengths`` (default: 0, 1, L // 2, L)."""
  length = jax.tree.leaves(xs)[0].shape[0]
  want = fun(xs)
  step, init = scanagram.as_scan(fun, xs)
  got = lax.scan(step, init, xs)[1]
  assert_trees_close(got, want, tol)
  if prefill_lengths is None:
    prefill_lengths = sorted({0, 1, length // 2, length})
  for p in prefill_lengths:
    prompt = jax.tree.map(lambda x: x[:p], xs)
    rest = jax.tree.map(lambda x: x[p:], xs)
    step, carry, out_prefill = scanagram.as_scan_with_prefill(fun, xs, prompt)
    assert_trees_close(out_prefill, jax.tree.map(lambda y: y[:p], want), tol)
    if p < length:
      got = lax.scan(step, carry, rest)[1]
      assert_trees_close(got, jax.tree.map(lambda y: y[p:], want), tol)
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
