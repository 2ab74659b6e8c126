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


def _described(fns):
  return {leaf.path: leaf for leaf in jax.tree.leaves(
      scanagram.describe_carry(fns),
      is_leaf=lambda x: isinstance(x, scanagram.CarryLeaf))}


def _mixed_model(L):
  """Attention, a convolution, a running sum and a delay, batch-major."""
  def f(w, x):                                  # x: [B, L, D]
    q, k, v = (jnp.einsum("bld,dhk->bhlk", x, w[n]) for n in "qkv")
    s = jnp.einsum("bhlk,bhmk->bhlm", q, k)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e9)
    o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
    h = jnp.einsum("bhlk,hkd->bld", o, w["o"])
    conv = jax.lax.conv_general_dilated(
        jnp.pad(h, ((0, 0), (2, 0), (0, 0))), w["c"], (1,), "VALID",
        dimension_numbers=("NWC", "WIO", "NWC"))
    return (jnp.cumsum(h, 1) + jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
            + conv)
  return f


def test_describe_carry_names_each_leaf_its_source_and_axes():
  """Every carry leaf is described: what it holds, the user's line, and
  its axes -- the key/value buffers [B, H, L, dh] time 2, batch and heads
  (0, 1); the convolution's ring, the running sum and the delay along time
  1 -- and with per-row positions the same shifted by the rows axis 0."""
  B, L, D, H = 2, 16, 8, 2
  f = _mixed_model(L)
  w = {n: jnp.ones((D, H, D // H)) for n in "qkv"}
  w["o"], w["c"] = jnp.ones((H, D // H, D)), jnp.ones((3, D, D))
  x = jnp.ones((B, L, D))
  line = inspect.getsourcelines(_mixed_model)[1]
  for rows in (None, 0):
    kw = {} if rows is None else dict(batch_axes=(None, 0), out_batch_axes=0)
    fns = scanagram.to_step(f, w, x, in_axes=(None, 1), out_axes=1, **kw)
    leaves = _described(fns)
    shift = 0 if rows is None else 1
    buffers = [v for v in leaves.values() if "of attention" in v.holds
               or "q·kᵀ" in v.holds or "weights·v" in v.holds]
    assert len(buffers) == 2, leaves
    for b in buffers:
      assert b.time_axis == 2 + shift and b.shape[b.time_axis] == L
      assert b.batch_axes == (shift, 1 + shift)
      # (with rows, B is the rows axis; each row's own batch axis has 1)
      assert [b.shape[a] for a in b.batch_axes] == [B if rows is None else 1,
                                                    H]
      assert b.rows_axis == rows
      # the q·kᵀ line for keys, the weights·v line for values
      at = line + (4 if "q·kᵀ" in b.holds else 6)
      assert f"test_explain.py:{at} " in b.source, (b.holds, b.source)
    others = {v.holds.split(",")[0]: v for v in leaves.values()
              if v not in buffers and v.path != "['position']"}
    assert set(others) == {"a ring of the last inputs of the convolution",
                           "the running sum",
                           "the last 1 elements of the value behind operand "
                           "1"}, others
    for leaf in others.values():
      assert leaf.time_axis == 1 + shift, leaf
      assert leaf.batch_axes == ()
    carry = fns.carry_spec()
    for leaf in leaves.values():   # the described shapes are the carry's
      path = leaf.path
      node = carry
      for part in path.strip("[]").split("]["):
        node = node[int(part) if part.isdigit() else part.strip("'")]
      assert tuple(node.shape) == leaf.shape, (path, node.shape)


def test_describe_carry_under_grouped_queries_and_a_recurrence():
  """A sliding-window ring at the key/value head count is described with
  its time and (batch, key/value heads) axes; an RNN's carry has no time
  axis."""
  B, L, D, H, KV, W = 2, 16, 8, 4, 2, 4

  def f(w, x):
    q = jnp.einsum("bld,dhk->bhlk", x, w["q"])
    k, v = (jnp.repeat(jnp.einsum("bld,dhk->bhlk", x, w[n]), H // KV, 1)
            for n in "kv")
    s = jnp.einsum("bhlk,bhmk->bhlm", q, k)
    i = jnp.arange(L)
    s = jnp.where((i[:, None] >= i) & (i[:, None] - i < W), s, -1e9)
    o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
    h = jnp.einsum("bhlk,hkd->bld", o, w["o"])
    _, r = jax.lax.scan(lambda c, x: (jnp.tanh(c + x),) * 2,
                        jnp.zeros((B, D)), jnp.swapaxes(h, 0, 1))
    return jnp.swapaxes(r, 0, 1)
  w = {"q": jnp.ones((D, H, 2)), "k": jnp.ones((D, KV, 2)),
       "v": jnp.ones((D, KV, 2)), "o": jnp.ones((H, 2, D))}
  fns = scanagram.to_step(f, w, jnp.ones((B, L, D)), in_axes=(None, 1),
                          out_axes=1)
  leaves = _described(fns)
  rings = [v for v in leaves.values() if "ring of the last 4" in v.holds]
  assert len(rings) == 2, leaves
  for ring in rings:
    assert ring.shape == (B, KV, W, 2)
    assert (ring.time_axis, ring.batch_axes) == (2, (0, 1))
  (carry,) = [v for v in leaves.values() if "scan's carry" in v.holds]
  assert carry.time_axis is None and carry.shape == (B, D)
