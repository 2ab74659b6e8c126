"""scanagram.convert_as: a function the conversion cannot look into (a
Pallas kernel here, run in interpret mode on the CPU) runs as itself and
converts as its plain-JAX reference, after a check that the two agree."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import scanagram

B, L, D = 2, 8, 4


def attention(q, k, v):
  """Causal softmax attention in plain JAX: converts to a KV cache."""
  s = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(q.shape[-1])
  s = jnp.where(jnp.tril(jnp.ones(s.shape[1:], bool)), s, -jnp.inf)
  return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(s, -1), v)


def _kernel(q_ref, k_ref, v_ref, o_ref):
  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = q @ k.T / np.sqrt(q.shape[-1])
  n = s.shape[0]
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  p = jnp.exp(jnp.where(rows >= cols, s, -jnp.inf) - s.max(-1, keepdims=True))
  o_ref[...] = (p / p.sum(-1, keepdims=True)) @ v


def pallas_attention(q, k, v):
  """The same attention as one Pallas kernel per batch row."""
  spec = pl.BlockSpec((None,) + q.shape[1:], lambda b: (b, 0, 0))
  return pl.pallas_call(
      _kernel, grid=(q.shape[0],), in_specs=[spec] * 3, out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), interpret=True)(
          q, k, v)


fused = scanagram.convert_as(attention)(pallas_attention)


def layer(attend):
  def model(w, x):                     # x: [B, L, D]
    return attend(x @ w[0], x @ w[1], x @ w[2]) @ w[3]
  return model


@pytest.fixture(scope="module")
def example():
  w = jax.random.normal(jax.random.key(0), (4, D, D))
  x = jax.random.normal(jax.random.key(1), (B, L, D))
  return w, x


def test_a_kernel_converts_as_its_reference(example):
  """A Pallas kernel has no rule (refused, saying to use convert_as);
  wrapped, the step is the reference's KV-cache step and matches the
  kernel's training mode at several prompt lengths."""
  w, x = example
  with pytest.raises(scanagram.ScanConversionError,
                     match=r"pallas_call.*scanagram.convert_as"):
    scanagram.to_step(layer(pallas_attention), w, x, in_axes=(None, 1),
                      out_axes=1)
  want = layer(fused)(w, x)
  np.testing.assert_allclose(want, layer(pallas_attention)(w, x), atol=0)
  fns = scanagram.to_step(layer(fused), w, x, in_axes=(None, 1), out_axes=1)
  for p in (0, 3, L):
    carry, out = fns.prefill(w, x[:, :p])
    np.testing.assert_allclose(out, want[:, :p], atol=1e-5)
  carry, _ = fns.prefill(w, x[:, :2])
  step = jax.jit(fns.step)
  for t in range(2, L):
    carry, y = step(w, carry, x[:, t])
    np.testing.assert_allclose(y, want[:, t], atol=1e-5)
  buffers = [a for a in jax.tree.leaves(carry) if a.shape == (B, L, D)]
  assert len(buffers) == 2, jax.tree.map(jnp.shape, carry)   # keys, values


def test_a_mismatching_reference_is_refused_naming_both(example):
  w, x = example

  def wrong(q, k, v):
    return attention(q, k, v) * 1.01
  model = layer(scanagram.convert_as(wrong)(pallas_attention))
  with pytest.raises(scanagram.ScanConversionError,
                     match=r"pallas_attention and its reference .*wrong "
                     r"differ"):
    scanagram.to_step(model, w, x, in_axes=(None, 1), out_axes=1)
  # within a tolerance given for rounding, it converts
  loose = layer(scanagram.convert_as(wrong, rtol=0.05, atol=0.05)(
      pallas_attention))
  scanagram.to_step(loose, w, x, in_axes=(None, 1), out_axes=1)


def test_outputs_of_another_shape_are_a_type_error(example):
  _, x = example
  with pytest.raises(TypeError, match="must give what"):
    scanagram.convert_as(lambda q, k, v: q[:, :1])(attention)(x, x, x)


def _fast(q, k, v):
  """Attention as a hand-written softmax: a different function (by
  rounding) from the reference, so which one ran is visible."""
  s = jnp.einsum("bqd,bkd->bqk", q, k) * (1 / np.sqrt(q.shape[-1]))
  s = s + jnp.triu(jnp.full(s.shape[1:], -1e30), 1)
  p = jnp.exp(s - s.max(-1, keepdims=True))
  return jnp.einsum("bqk,bkd->bqd", p, v) / p.sum(-1)[..., None] + 1e-6


def test_jit_grad_and_vmap_run_the_fast_function(example):
  w, x = example
  wrapped = scanagram.convert_as(attention)(_fast)
  q, k, v = x @ w[0], x @ w[1], x @ w[2]
  got = jax.jit(wrapped)(q, k, v)
  np.testing.assert_array_equal(got, jax.jit(_fast)(q, k, v))
  assert not np.array_equal(got, jax.jit(attention)(q, k, v))
  grad = jax.grad(lambda w: layer(wrapped)(w, x).sum())(w)
  np.testing.assert_allclose(
      grad, jax.grad(lambda w: layer(_fast)(w, x).sum())(w), rtol=1e-6)
  per_row = jax.vmap(lambda q, k, v: wrapped(q[None], k[None], v[None])[0])
  np.testing.assert_allclose(per_row(q, k, v), _fast(q, k, v), rtol=1e-6)
  # vmap keeps the primitive: a model that maps the layer over rows
  # still converts, as the reference
  jaxpr = jax.make_jaxpr(per_row)(q, k, v)
  assert "convert_as" in {e.primitive.name for e in jaxpr.eqns}

  def rows_model(w, x):
    return per_row(x @ w[0], x @ w[1], x @ w[2]) @ w[3]
  fns = scanagram.to_step(rows_model, w, x, in_axes=(None, 1), out_axes=1)
  want = rows_model(w, x)
  carry, out = fns.prefill(w, x[:, :L - 1])
  np.testing.assert_allclose(out, want[:, :L - 1], atol=1e-5)
  _, y = fns.step(w, carry, x[:, L - 1])
  np.testing.assert_allclose(y, want[:, L - 1], atol=1e-5)


def test_dot_product_attention_converts_as_its_xla_implementation():
  """scanagram.nn.dot_product_attention runs what JAX picks (cuDNN's fused
  kernel on a GPU with cuDNN, which no rule can look into) and converts as
  the XLA implementation; "xla" is JAX's own call, unwrapped."""
  H = 2
  x = jax.random.normal(jax.random.key(2), (B, L, H, D))

  def model(x, implementation=None):
    return scanagram.nn.dot_product_attention(
        x, x, x, is_causal=True, implementation=implementation)
  names = {e.primitive.name for e in jax.make_jaxpr(model)(x).eqns}
  assert names == {"convert_as"}
  assert "convert_as" not in {e.primitive.name for e in jax.make_jaxpr(
      lambda x: model(x, "xla"))(x).eqns}
  want = jax.nn.dot_product_attention(x, x, x, is_causal=True)
  fns = scanagram.to_step(model, x, in_axes=1, out_axes=1)
  carry, out = fns.prefill(x[:, :3])
  np.testing.assert_allclose(out, want[:, :3], atol=1e-5)
  for t in range(3, L):
    carry, y = fns.step(carry, x[:, t])
    np.testing.assert_allclose(y, want[:, t], atol=1e-5)


def test_a_lazy_pair_converts_it_at_its_first_jitted_call(example):
  """StepPair with num_unscanned converts inside its first jitted call: the
  check of the kernel against its reference still runs on values."""
  w, x = example
  pair = scanagram.StepPair(layer(fused), None, x, axis=1, num_unscanned=1)
  carry, out = pair.prefill(w, x[:, :3])
  want = layer(fused)(w, x)
  np.testing.assert_allclose(out, want[:, :3], atol=1e-5)
  _, y = pair.step(w, carry, x[:, 3])
  np.testing.assert_allclose(y, want[:, 3], atol=1e-5)
