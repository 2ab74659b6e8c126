"""scanagram.explain: the jaxpr with kinds, each carry entry under the
equation that keeps it, and refusals shown where they happen."""
import inspect
import io

import jax
import jax.numpy as jnp
import numpy as np

import scanagram
from conftest import causal_mask, random_like, window_mask

T, D, S = 8, 4, 6
W = jax.random.normal(jax.random.key(0), (4, D, D)) / 2


def attention(w, x, mask=causal_mask):
  q, k, v = x @ w[0], x @ w[1], x @ w[2]
  logits = jnp.where(mask(x.shape[0]), q @ k.T, -1e9)
  h = jax.nn.softmax(logits) @ v
  h = h + jnp.pad(h[:-1], ((1, 0), (0, 0)))     # a shift: one past of h
  return jnp.cumsum(h, 0)                        # a running sum


def line_of(fun, code):
  """``test_explain.py:N (fun)`` of the line of ``fun`` containing ``code``."""
  lines, first = inspect.getsourcelines(fun)
  n = next(first + i for i, line in enumerate(lines) if code in line)
  return f"test_explain.py:{n} ({fun.__name__})"


def carry_bytes(fns, *unscanned):
  carry = jax.eval_shape(fns.init, *unscanned)
  return sum(x.size * x.dtype.itemsize for name, entry in carry.items()
             if name != "position" for x in jax.tree.leaves(entry))


def test_kinds_and_each_carry_entry_with_its_source_line():
  x = random_like(jnp.zeros((T, D)))
  out = io.StringIO()
  text = scanagram.explain(attention, W, x, in_axes=(None, 0), file=out)
  assert out.getvalue() == text + "\n"
  lines = text.splitlines()
  assert lines[0].startswith("scanagram.explain: attention")
  assert any("args[1]" in l and "scanned along 0" in l for l in lines)
  assert any("args[0]" in l and "unscanned" in l for l in lines)
  carry = [l for l in lines if l.lstrip().startswith("carry[")]
  assert len(carry) == 4, carry
  keys, values, past, running = carry
  assert "f32[4,8] 128 B: the keys of q·kᵀ, a buffer over every position" \
      in keys and line_of(attention, "q @ k.T") in keys
  assert "f32[8,4] 128 B: the values of weights·v" in values
  assert "f32[1,4] 16 B: the last 1 elements" in past
  assert line_of(attention, "h + jnp.pad") in past
  assert "the running sum" in running
  assert line_of(attention, "jnp.cumsum") in running
  assert any("scores (rows 0, keys 1; future NEG)" in l for l in lines)
  total = carry_bytes(scanagram.to_step(attention, W, x, in_axes=(None, 0)),
                      W)
  assert lines[-1].startswith(f"carry: {total} B in state entries")


def test_a_window_keeps_a_ring():
  def f(x):
    return attention(W, x, window_mask(3))
  text = scanagram.explain(f, jnp.zeros((16, D)), file=False)
  assert "the keys of q·kᵀ, a ring of the last 3 positions" in text
  assert "the values of weights·v, a ring of the last 3 positions" in text


def test_work_on_unscanned_data_is_shown_carried():
  """An encoder's keys, computed once from the source, are carried."""
  def f(w, src, x):
    memory = jnp.tanh(src @ w[3])               # [S, D], the encoder
    k, v = memory @ w[1], memory @ w[2]
    weights = jax.nn.softmax((x @ w[0]) @ k.T)
    return weights @ v
  src = random_like(jnp.zeros((S, D)))
  text = scanagram.explain(f, W, src, jnp.zeros((T, D)),
                           in_axes=(None, None, 0), param_argnums=0,
                           file=False)
  carried = [l for l in text.splitlines() if "computed once" in l]
  # the keys (transposed for q·kᵀ) and the values, not the encoder output
  assert len(carried) == 2, text
  assert "f32[4,6] 96 B" in carried[1] and "f32[6,4] 96 B" in carried[0]
  assert all("test_explain.py:" in l for l in carried)


def test_a_refusal_is_shown_where_it_happens():
  def f(x):
    y = jnp.cumsum(x, 0)
    return jnp.sort(y, 0)
  text = scanagram.explain(f, jnp.zeros((T, D)), file=False)
  lines = text.splitlines()
  assert lines[0] == "scanagram.explain: refused"
  refused = [l for l in lines if l.endswith("<- refused")]
  assert len(refused) == 1 and "test_explain.py:" in refused[0]
  assert any("scanned along 0" in l and "= jit" in l for l in lines)
  assert lines[-1].startswith("refused: cannot convert `sort` at ")
  assert "test_explain.py:" in lines[-1]


def test_explain_converts_as_to_step_does():
  """The same options, the same conversion: a batch-major model."""
  x = jnp.zeros((2, T, D))
  text = scanagram.explain(lambda x: jnp.cumsum(x, 1), x, in_axes=1,
                           out_axes=1, file=False)
  assert "scanned along 1" in text and "running sum" in text
  np.testing.assert_equal("refused" in text, False)
