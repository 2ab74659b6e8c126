"""The quick demo: convert a causal convolution stack and an LSTM, check the
derived step against the training mode, and print the result.

Run: python examples/demo.py
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram


def conv_stack(params, xs):
  """Three dilated causal convolutions. xs: [T, C]."""
  h = xs[None]
  for i, w in enumerate(params):
    rate = 2 ** i
    h = jax.nn.relu(lax.conv_general_dilated(
        h, w, (1,), [((w.shape[0] - 1) * rate, 0)], rhs_dilation=(rate,),
        dimension_numbers=("NWC", "WIO", "NWC"))) + h
  return h[0]


def lstm(params, xs):
  """A hand-written LSTM through lax.scan. xs: [T, D]."""
  w, b = params
  hidden = w.shape[1] // 4

  def cell(carry, x):
    h, c = carry
    i, f, g, o = jnp.split(jnp.concatenate([x, h]) @ w + b, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  return lax.scan(cell, (jnp.zeros(hidden), jnp.zeros(hidden)), xs)[1]


def check(name, fun, params, xs, prompt_length):
  fns = scanagram.to_step(fun, params, xs, in_axes=(None, 0))
  carry, out_prompt = fns.prefill(params, xs[:prompt_length])
  step = jax.jit(fns.step)
  outs = [out_prompt]
  for x in xs[prompt_length:]:
    carry, y = step(params, carry, x)
    outs.append(y[None])
  got = jnp.concatenate(outs)
  err = float(jnp.max(jnp.abs(got - fun(params, xs))))
  shapes = {k: [l.shape for l in jax.tree.leaves(v)]
            for k, v in carry.items()}
  print(f"{name:<12} L={xs.shape[0]} prompt={prompt_length}  max |step - "
        f"training| = {err:.2e}  carry: {shapes}")
  return err


def main():
  keys = jax.random.split(jax.random.key(0), 6)
  xs = jax.random.normal(keys[0], (32, 8))
  conv_params = [jax.random.normal(k, (2, 8, 8)) / 4 for k in keys[1:4]]
  lstm_params = (jax.random.normal(keys[4], (16, 32)) / 4, jnp.zeros(32))
  errors = [check("conv stack", conv_stack, conv_params, xs, 5),
            check("lstm", lstm, lstm_params, xs, 5)]
  if max(errors) > 1e-4:
    raise SystemExit("the derived step differs from the training mode")
  print("ok: the derived steps match the training mode")


if __name__ == "__main__":
  main()
