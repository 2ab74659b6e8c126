"""Masks proven symbolically (scanagram.symbolic): at any L, without an L×L
array, with the same results as the concrete proofs.

The property tests compare, on small L and many mask styles, three proofs:
the symbolic one (the mask as the interpreter knows it: a function of its
indices), the same code on the materialised mask (every key visited), and
the former concrete proof (kept here as the reference)."""
import types

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import scanagram
from scanagram import interpreter, symbolic
from scanagram.kinds import (EXACT, NEG, NEG_THRESHOLD, TAINTED,
                             TAINTED_FINITE, UNSCANNED, Future, History)
from scanagram.rules.attention import masks, scores
from scanagram.rules.attention.learning import ATTENTION
from scanagram.rules.attention.future import (future_region, operand_future,
                                              picked_future)
from conftest import check_refused, check_scan, random_like


# -- the former concrete proofs, as the reference -----------------------------
class Refused(Exception):
  pass


def _rows_keys(shape, axis, key_axis):
  rows = np.arange(shape[axis]).reshape(
      [-1 if d == axis else 1 for d in range(len(shape))])
  keys = np.arange(shape[key_axis]).reshape(
      [-1 if d == key_axis else 1 for d in range(len(shape))])
  return rows, keys


def _old_region(shape, axis, key_axis, window=None):
  rows, keys = _rows_keys(shape, axis, key_axis)
  region = keys > rows
  if window is not None:
    region = region | (keys <= rows - window)
  return region


def _old_known_future(value, region):
  values = np.broadcast_to(value, np.broadcast_shapes(value.shape,
                                                      region.shape))
  picked = values[np.broadcast_to(region, values.shape)]
  if picked.size and np.all(picked == picked.flat[0]):
    return Future.constant(picked.flat[0])
  return EXACT


def _old_kept(h, fill_like, shape):
  rows, keys = _rows_keys(shape, h.axis, h.key_axis)
  return ~fill_like & np.broadcast_to(keys <= rows, shape)


def _old_refuse_empty_rows(h, fill_like, shape):
  empty = ~_old_kept(h, fill_like, shape).any(axis=h.key_axis, keepdims=True)
  if empty.any():
    row = np.argwhere(empty)[0][h.axis]
    raise Refused(
        f"its mask keeps no key at all for query {row}: the row is all fill, "
        "so softmax gives every position the same weight, future ones "
        "included (a causal mask keeps at least key j = i)")


def _old_proven_window(h, fill_like, shape):
  rows, keys = _rows_keys(shape, h.axis, h.key_axis)
  distance = np.broadcast_to(rows - keys, shape)[_old_kept(h, fill_like,
                                                           shape)]
  window = int(distance.max()) + 1 if distance.size else 1
  return window if window < shape[h.key_axis] else None


def old_select(shape, h, mask, cases):
  """The former ``_prove_mask``: cases are ``(kind, value or None)``."""
  region = _old_region(shape, h.axis, h.key_axis, h.window)
  full = np.broadcast_shapes(mask.shape, region.shape)
  choice = np.broadcast_to(mask, full).astype(np.int64)
  in_region = np.broadcast_to(region, full)
  picked, fill_like, fill_values = [], np.zeros(full, bool), []
  for case, (kind, value) in enumerate(cases):
    where = in_region & (choice == case)
    if not where.any():
      continue
    if isinstance(kind, History):
      f = kind.future
    else:
      f = EXACT if value is None else _old_known_future(value, region)
    if f.tainted:
      index = np.argwhere(where)[0]
      which = ("a future position (a causal mask keeps key j for query i "
               "only when j <= i)" if index[h.key_axis] > index[h.axis] else
               f"outside the window of {h.window}")
      raise Refused(f"its mask keeps key {index[h.key_axis]} for query "
                    f"{index[h.axis]}: {which}")
    if value is not None:
      value = np.broadcast_to(value, np.broadcast_shapes(value.shape, full))
      picked_values = value[where]
      f = (Future.constant(picked_values.flat[0])
           if np.all(picked_values == picked_values.flat[0]) else EXACT)
      if f.value is not None:
        same = value == f.value if not f.below else value <= NEG_THRESHOLD
        fill_like |= (choice == case) & same
        fill_values.append(f.value)
    picked.append(f)
  future = picked_future(picked)
  # a row all -inf is the same in both modes: only a finite fill is refused
  minus_inf = len(fill_values) == len(picked) and all(
      v == -np.inf for v in fill_values)
  if future == NEG and not minus_inf:
    _old_refuse_empty_rows(h, fill_like, full)
  window = None
  if h.window is None and (future == NEG or future.value is not None):
    window = _old_proven_window(h, fill_like, full)
  return future, window


def old_additive(shape, h, bias):
  fill_like = np.broadcast_to(bias <= NEG_THRESHOLD, shape)
  _old_refuse_empty_rows(h, fill_like, shape)
  return _old_proven_window(h, fill_like, shape) if h.window is None else None


def old_band(values, h):
  rows, keys = _rows_keys(values.shape, h.axis, h.key_axis)
  inside = np.broadcast_to((rows - keys >= 0) & (rows - keys < h.window),
                           values.shape)
  within, beyond = values[inside], values[~inside]
  if not within.size or not beyond.size:
    return None
  if not ((within == within.flat[0]).all() and
          (beyond == beyond.flat[0]).all()):
    return None
  return within.flat[0], beyond.flat[0]


# -- the new proofs, on a stand-in for the equation ---------------------------
class FakeEqn:
  """What the proofs read of an equation: kinds, known values, avals."""

  def __init__(self, name, shape, kinds, values, dtypes):
    self.primitive = types.SimpleNamespace(name=name)
    self.in_kinds = tuple(kinds)
    self.out_avals = (types.SimpleNamespace(shape=tuple(shape)),)
    self.in_avals = tuple(
        types.SimpleNamespace(shape=tuple(np.shape(v)) if v is not None
                              else tuple(shape), dtype=np.dtype(d))
        for v, d in zip(values, dtypes))
    self._values = list(values)
    self.conversion = interpreter.Conversion()

  def known(self, i):
    return self._values[i]

  def refuse(self, why):
    return Refused(why)


def outcome(run):
  try:
    return run()
  except Refused as err:
    return "refused", str(err)


def new_select(shape, h, mask, cases):
  kinds = [UNSCANNED] + [k for k, _ in cases]
  values = [mask] + [v for _, v in cases]
  dtypes = [mask.dtype] + [np.float32 if v is None else v.dtype
                           for _, v in cases]
  e = FakeEqn("select_n", shape, kinds, values, dtypes)
  future = masks.select_future(e, h)
  return future, e.conversion.notes(ATTENTION).windows.get(h.origin)


def new_additive(shape, h, bias):
  e = FakeEqn("add", shape, [h, UNSCANNED], [None, bias],
              [np.float32, bias.dtype])
  region = future_region(shape, h.axis, h.key_axis, h.window)
  futures = [TAINTED_FINITE, operand_future(e, 1, region)]
  if masks.additive_mask(e, h, futures, region) is None:
    return "not additive"
  return e.conversion.notes(ATTENTION).windows.get(h.origin)


def new_band(values, h):
  e = FakeEqn("add", values.shape, [UNSCANNED], [values], [values.dtype])
  band = scores._band(e, 0, h)
  return None if band is None else tuple(band)


def lazy_value(fn):
  """The value the interpreter knows for ``fn()`` (a Lazy where it is a
  function of its indices)."""
  closed = jax.make_jaxpr(fn)()
  out, = symbolic.evaluate_jaxpr(closed.jaxpr, closed.consts, [],
                                 interpreter.ELEMENTWISE_PRIMITIVES)
  return out


def same(a, b):
  if isinstance(a, float) and isinstance(b, float):
    return a == b or (np.isnan(a) and np.isnan(b))
  if isinstance(a, tuple) and isinstance(b, tuple):
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
  return a is b or a == b


# -- mask styles, generated ---------------------------------------------------
def affine(draw):
  a = draw(st.sampled_from([-1, 0, 1, 1, 2]))
  b = draw(st.sampled_from([-1, 0, 1, 1, -2]))
  c = draw(st.integers(-4, 4))
  return ("affine", a, b, c)


@st.composite
def formulas(draw, depth=2):
  leaf = draw(st.sampled_from(["cmp", "cmp", "tril", "triu", "window"]))
  if depth == 0 or draw(st.booleans()):
    if leaf == "cmp":
      return ("cmp", draw(st.sampled_from(["ge", "gt", "le", "lt", "eq",
                                           "ne"])), affine(draw),
              affine(draw))
    if leaf == "window":
      return ("window", draw(st.integers(1, 5)))
    return (leaf, draw(st.integers(-3, 3)))
  op = draw(st.sampled_from(["and", "or", "not", "where", "xor"]))
  n = {"not": 1, "where": 3}.get(op, 2)
  return (op,) + tuple(draw(formulas(depth - 1)) for _ in range(n))


CAUSAL = ("cmp", "ge", ("affine", 1, 0, 0), ("affine", 0, 1, 0))


@st.composite
def masks_formulas(draw):
  """Mostly causal masks (a formula and-ed with i >= j or with a window,
  sometimes keeping the diagonal), so that proofs succeed as often as they
  are refused."""
  f = draw(formulas())
  style = draw(st.sampled_from(["raw", "causal", "causal", "window",
                                "diagonal"]))
  if style == "causal":
    return ("and", CAUSAL, f)
  if style == "window":
    return ("and", ("window", draw(st.integers(1, 5))), f)
  if style == "diagonal":
    return ("or", ("and", CAUSAL, f), ("cmp", "eq", ("affine", 1, 0, 0),
                                       ("affine", 0, 1, 0)))
  return f


def build(formula, i, j):
  """The formula on index arrays ``i`` (rows) and ``j`` (keys)."""
  kind = formula[0]
  if kind == "affine":
    _, a, b, c = formula
    return a * i + b * j + c
  if kind == "cmp":
    op, x, y = formula[1:]
    x, y = build(x, i, j), build(y, i, j)
    return {"ge": x >= y, "gt": x > y, "le": x <= y, "lt": x < y,
            "eq": x == y, "ne": x != y}[op]
  n = (i + j).shape
  if kind == "tril":
    return jnp.tril(jnp.ones(n, bool), formula[1])
  if kind == "triu":
    return jnp.triu(jnp.ones(n, bool), formula[1])
  if kind == "window":
    return (i >= j) & (i - j < formula[1])
  args = [build(f, i, j) for f in formula[1:]]
  if kind == "and":
    return args[0] & args[1]
  if kind == "or":
    return args[0] | args[1]
  if kind == "xor":
    return args[0] ^ args[1]
  if kind == "not":
    return ~args[0]
  return jnp.where(*args)


LAYOUTS = ["rows-keys", "keys-rows", "batch-heads", "sliced", "flipped",
           "arange-constant", "float-01", "per-batch-atom", "per-batch-array"]


def mask_fn(formula, layout, n):
  """``fn() -> (mask, axis, key_axis)`` in ``layout``."""
  def grid(size):
    return jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  if layout == "rows-keys":
    return lambda: build(formula, *grid(n)), 0, 1
  if layout == "keys-rows":
    return lambda: jnp.transpose(build(formula, *grid(n))), 1, 0
  if layout == "batch-heads":
    return (lambda: jnp.broadcast_to(build(formula, *grid(n))[None, None],
                                     (2, 3, n, n)), 2, 3)
  if layout == "sliced":  # a mask for 2n positions, its last n rows/keys
    return lambda: build(formula, *grid(2 * n))[n:, n:], 0, 1
  if layout == "flipped":  # indices counted from the end
    i, j = grid(n)
    return lambda: jnp.flip(build(formula, n - 1 - i, n - 1 - j)), 0, 1
  if layout == "arange-constant":  # np.arange closed over: a constant
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    return lambda: build(formula, jnp.asarray(i), jnp.asarray(j)), 0, 1
  if layout == "per-batch-atom":  # an atom over the batch axis too
    def per_batch():
      b = jnp.arange(3)[:, None, None]
      i, j = jnp.arange(n)[None, :, None], jnp.arange(n)[None, None, :]
      return build(formula, i, j) & (i - j >= 1 - b)
    return per_batch, 1, 2
  if layout == "per-batch-array":  # concatenated: a constant array
    return (lambda: jnp.stack([build(formula, *grid(n)),
                               jnp.tri(n, dtype=bool)], 1), 0, 2)
  return (lambda: build(formula, *grid(n)).astype(jnp.float32) != 0.0), 0, 1


def _proofs(formula, layout, n, window, fill, fill_first):
  fn, axis, key_axis = mask_fn(formula, layout, n)
  if fill_first:  # where(~mask, fill, scores): select_n(~mask, scores, fill)
    fn = (lambda f: lambda: ~f())(fn)
  mask = lazy_value(fn)
  want = np.asarray(jax.jit(fn)())
  np.testing.assert_array_equal(np.asarray(mask), want)
  shape = want.shape
  h = History(axis, key_axis, 0, TAINTED_FINITE, window, "origin")
  fill = np.float32(fill)
  cases = [(UNSCANNED, fill), (h, None)]  # select_n(mask, fill, scores)
  if fill_first:
    cases = cases[::-1]
  results = [outcome(lambda m=m: new_select(shape, h, m, cases))
             for m in (mask, want)]
  results.append(outcome(lambda: old_select(shape, h, want, cases)))
  return mask, want, h, results


settings.register_profile(
    "masks", max_examples=20, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


@settings(settings.get_profile("masks"))
@given(formula=masks_formulas(), layout=st.sampled_from(LAYOUTS),
       n=st.integers(2, 9), window=st.sampled_from([None, None, 1, 2, 3]),
       fill=st.sampled_from([-1e9, -np.inf, 0.0, 1.0]),
       fill_first=st.booleans())
def test_symbolic_select_proofs_equal_the_concrete_ones(
    formula, layout, n, window, fill, fill_first):
  """The mask evaluates symbolically to the array JAX computes, and the
  proof of ``where(mask, scores, fill)`` (the future record, the proven
  window, or the refusal and its message) is the concrete proof's."""
  _, _, _, (symbolic_, dense, old) = _proofs(formula, layout, n, window, fill,
                                             fill_first)
  assert same(symbolic_, old), (symbolic_, old)
  assert same(dense, old), (dense, old)


@settings(settings.get_profile("masks"))
@given(formula=masks_formulas(), layout=st.sampled_from(LAYOUTS),
       n=st.integers(2, 9), window=st.sampled_from([None, 1, 2, 3]),
       fill=st.sampled_from([-1e9, -1e30, -2e4]))
def test_symbolic_additive_and_band_proofs_equal_the_concrete_ones(
    formula, layout, n, window, fill):
  """An additive mask ``where(mask, 0, fill)`` and a band (one value in the
  window, another outside) prove as the concrete checks do."""
  fn, axis, key_axis = mask_fn(formula, layout, n)
  bias_fn = lambda: jnp.where(fn(), 0.0, fill)  # noqa: E731
  bias = lazy_value(bias_fn)
  want = np.asarray(jax.jit(bias_fn)())
  np.testing.assert_array_equal(np.asarray(bias), want)
  h = History(axis, key_axis, 0, TAINTED_FINITE, window, "origin")
  region = future_region(want.shape, axis, key_axis, window)
  e = FakeEqn("add", want.shape, [UNSCANNED], [bias], [np.float32])
  assert same(operand_future(e, 0, region),
              _old_known_future(want, np.asarray(region)))
  if _old_known_future(want, np.asarray(region)).below:
    got = [outcome(lambda b=b: new_additive(want.shape, h, b))
           for b in (bias, want)]
    old = outcome(lambda: old_additive(want.shape, h, want))
    assert same(got[0], old) and same(got[1], old), (got, old)
  if window is not None:
    old = old_band(want, h)
    assert same(new_band(bias, h), old)
    assert same(new_band(want, h), old)


# -- symbolic values ----------------------------------------------------------
def test_masks_at_long_length_stay_symbolic():
  """A causal or window mask at L = 2^20 is a function of its indices
  (nothing of L² elements is built), and its proof is immediate."""
  n = 1 << 20
  for fn in (lambda: jnp.tril(jnp.ones((n, n), bool)),
             lambda: jnp.arange(n)[:, None] >= jnp.arange(n)[None, :],
             lambda: jnp.where(jnp.tri(n, dtype=bool), 0.0, -1e9)):
    value = lazy_value(fn)
    assert isinstance(value, symbolic.Lazy)
    assert not isinstance(value, symbolic.Const)
  h = History(0, 1, 0, TAINTED_FINITE, None, "origin")
  mask = lazy_value(lambda: (jnp.arange(n)[:, None] >= jnp.arange(n)[None, :])
                    & (jnp.arange(n)[:, None] - jnp.arange(n)[None, :] < 7))
  assert new_select((n, n), h, mask, [(UNSCANNED, np.float32(-1e9)),
                                      (h, None)]) == (NEG, 7)


def test_broadcast_constant_is_not_materialised():
  """``broadcast_in_dim`` of a constant keeps one element per distinct
  value: a [B, H, L, L] broadcast of a scalar or of a row is tiny."""
  value = lazy_value(lambda: jnp.broadcast_to(jnp.float32(-1e9),
                                              (8, 8, 4096, 4096)))
  assert isinstance(value, symbolic.Const) and value.array.size == 1
  row = np.linspace(0, 1, 4096).astype(np.float32)
  value = lazy_value(lambda: jnp.broadcast_to(jnp.asarray(row),
                                              (8, 8, 4096, 4096)) * 2)
  assert value.array.shape == (1, 1, 1, 4096)


def test_affine_values_keep_their_dtype_exact():
  """An affine value that would wrap in its dtype is not kept affine: its
  comparisons are computed as JAX computes them."""
  n = 300
  fn = lambda: (jnp.arange(n, dtype=jnp.uint8)[:, None] -  # noqa: E731
                jnp.arange(n, dtype=jnp.uint8)[None, :]) < 5
  np.testing.assert_array_equal(np.asarray(lazy_value(fn)),
                                np.asarray(jax.jit(fn)()))
  fn = lambda: jnp.arange(8, dtype=jnp.float32)[:, None] >= 2.5  # noqa: E731
  np.testing.assert_array_equal(np.asarray(lazy_value(fn)),
                                np.asarray(jax.jit(fn)()))


# -- conversion at long L -----------------------------------------------------
@pytest.mark.parametrize("style", ["tril", "arange", "haiku", "window"])
def test_transformer_at_L_32768_converts(style):
  """A 2-layer, 4-head transformer over L = 32768 converts (shape structs:
  nothing of length L is allocated); the window model gets rings."""
  from benchmarks.long_context import WINDOW, convert
  fns, _, _ = convert(style, 32768)
  shapes = [x.shape for x in jax.tree.leaves(fns.carry_spec()) if x.ndim]
  assert shapes and all((32768 in s) == (style != "window") for s in shapes)
  if style == "window":
    assert all(WINDOW in s for s in shapes), shapes


def test_haiku_mha_mask_broadcast_to_batch_and_heads_converts():
  """The issue's case: hk.MultiHeadAttention broadcasts a [B, 1, L, L]
  mask to B·H·L² (16 · 8 · 512²: over 2^24) inside its ``jnp.where``."""
  b, t, heads = 16, 512, 8

  def f(x):
    mask = jnp.tril(jnp.ones((b, 1, t, t), bool))
    return hk.MultiHeadAttention(heads, 4, w_init_scale=1.0)(x, x, x,
                                                             mask=mask)
  net = hk.without_apply_rng(hk.transform(f))
  x = jax.ShapeDtypeStruct((b, t, 16), jnp.float32)
  params = jax.eval_shape(net.init, jax.random.key(0), x)
  scanagram.to_step(net.apply, params, x, in_axes=(None, 1), out_axes=1)


# -- small L: the step equals the training mode --------------------------------
L, D = 7, 4
W = jax.random.normal(jax.random.key(3), (3, D, D)) / 2


def attention(mask, fill=-1e9, additive=False):
  def f(x):
    q, k, v = x @ W[0], x @ W[1], x @ W[2]
    logits = q @ k.T * 0.5
    if additive:
      logits = logits + mask(x.shape[0])
    else:
      logits = jnp.where(mask(x.shape[0]), logits, fill)
    return jax.nn.softmax(logits, axis=-1) @ v
  return f


def _grid(n):
  return jnp.arange(n)[:, None], jnp.arange(n)[None, :]


MASKS = {
    "tri": lambda n: jnp.tri(n, dtype=bool),
    "tril-of-longer-sliced": lambda n: jnp.tril(jnp.ones((2 * n, 2 * n),
                                                         bool))[:n, :n],
    "triu-transposed": lambda n: jnp.triu(jnp.ones((n, n), bool)).T,
    "not-triu": lambda n: ~jnp.triu(jnp.ones((n, n), bool), 1),
    "window-and-causal": lambda n: (lambda i, j: (i >= j) & (i - j < 3))(
        *_grid(n)),
    "window-triu-tril": lambda n: jnp.triu(jnp.tril(jnp.ones((n, n), bool)),
                                           -2),
    "or-of-diagonal": lambda n: (lambda i, j: (i > j) | (i == j))(*_grid(n)),
    "float-mask-cast": lambda n: jnp.tril(jnp.ones((n, n))).astype(bool),
    "expand-squeeze": lambda n: jnp.squeeze(jnp.expand_dims(
        jnp.tri(n, dtype=bool), 0), 0),
    "flipped-twice": lambda n: jnp.flip(jnp.flip(jnp.tri(n, dtype=bool), 0),
                                        1).T,
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_styles_convert(name):
  check_scan(attention(MASKS[name]), random_like(jnp.zeros((L, D))),
             prefill_lengths=[0, 3])


@pytest.mark.parametrize("mask", [
    lambda n: jnp.where(jnp.tril(jnp.ones((n, n), bool)), 0.0, -1e9),
    lambda n: jnp.where(_grid(n)[0] >= _grid(n)[1], 0.0, -jnp.inf),
    lambda n: (1.0 - jnp.tri(n)) * -1e9,
], ids=["where-tril", "where-iota-inf", "one-minus-tri"])
def test_additive_masks_convert(mask):
  check_scan(attention(mask, additive=True), random_like(jnp.zeros((L, D))),
             prefill_lengths=[0, 3])


def test_additive_window_gets_a_ring():
  mask = lambda n: jnp.where(  # noqa: E731
      (lambda i, j: (i >= j) & (i - j < 2))(*_grid(n)), 0.0, -1e9)
  fns = scanagram.to_step(attention(mask, additive=True), jnp.zeros((64, D)))
  assert all(64 not in x.shape for x in jax.tree.leaves(fns.carry_spec()))
  check_scan(attention(mask, additive=True), random_like(jnp.zeros((L, D))),
             prefill_lengths=[0, 3])


# -- refusals -----------------------------------------------------------------
def test_future_key_named_at_long_length():
  """A mask that keeps one future key is refused at L = 32768 with the
  query and key named, as at small L."""
  def mask(n):
    i, j = _grid(n)
    return (i >= j) | ((i == 20000) & (j == 30000))
  check_refused(attention(mask), jax.ShapeDtypeStruct((32768, D),
                                                      jnp.float32),
                "its mask keeps key 30000 for query 20000: a future position")


def test_empty_row_named_at_long_length():
  def mask(n):
    i, j = _grid(n)
    return (i >= j) & (i != 12345)
  check_refused(attention(mask), jax.ShapeDtypeStruct((32768, D),
                                                      jnp.float32),
                "its mask keeps no key at all for query 12345")


def test_too_large_constant_names_the_limit(monkeypatch):
  """A mask scanagram must compute concretely (here a cumsum) past the
  limit is refused as too large, naming the limit; not as depending on an
  input."""
  monkeypatch.setattr(interpreter, "_MAX_KNOWN_ELEMENTS", 16)
  mask = lambda n: jnp.cumsum(jnp.eye(n, dtype=jnp.int32), 1) > 0  # noqa
  message = check_refused(attention(mask), jnp.zeros((L, D)),
                          "cannot check at conversion time",
                          "more than the limit of 16",
                          "_MAX_KNOWN_ELEMENTS")
  assert "depends on an input" not in message


def test_arbitrary_constant_too_large_to_visit_names_the_limit(monkeypatch):
  monkeypatch.setattr(symbolic, "MAX_POINTS", 10)
  table = np.tril(np.ones((L, L), bool))
  message = check_refused(attention(lambda n: table), jnp.zeros((L, D)),
                          "cannot check at conversion time",
                          "more than the limit of 10", "MAX_POINTS")
  assert "depends on an input" not in message


def test_mask_from_an_input_still_says_so():
  def f(x, m):
    q, k, v = x @ W[0], x @ W[1], x @ W[2]
    logits = jnp.where(m, q @ k.T, -1e9)
    return jax.nn.softmax(logits, axis=-1) @ v
  with pytest.raises(scanagram.ScanConversionError,
                     match="depends on an input of the function"):
    scanagram.to_step(f, jnp.zeros((L, D)), jnp.ones((L, L), bool),
                      in_axes=(0, None))


def test_constant_mask_check_is_blockwise():
  """An arbitrary constant mask (a numpy array) is visited block by block:
  the same proof as the symbolic one."""
  table = np.tril(np.ones((L, L), bool)) & ~np.eye(L, k=-3, dtype=bool)
  check_scan(attention(lambda n: table), random_like(jnp.zeros((L, D))),
             prefill_lengths=[0, 3])


def test_tainted_scores_at_a_non_window_key_named():
  h = History(0, 1, 0, TAINTED, 2, "origin")
  mask = lazy_value(lambda: jnp.tri(6, dtype=bool))
  got = outcome(lambda: new_select((6, 6), h, mask,
                                   [(UNSCANNED, np.float32(-1e9)), (h, None)]))
  assert got == ("refused", "its mask keeps key 0 for query 2: outside the "
                 "window of 2")
