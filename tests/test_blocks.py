"""Block mode: ``extend`` runs k >= 1 elements at once from any position.

For every family of state (KV buffers, rings, RNN carries, convolution
queues, running sums, associative-scan prefixes, per-layer states, delay
lines) a block of any size at any position gives the training mode's outputs
at those positions, and the carry ``lax.scan`` of ``step`` gives. Past L: a
model whose state needs L (``max_length == L``) refuses eagerly and returns
NaN under ``jit``; a model with ``max_length is None`` steps on, and matches
the training mode run on the longer sequence.
"""
import dataclasses
from typing import Any, Callable, Optional, Tuple

import haiku as hk
import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import (assert_trees_close, blocks as _blocks, causal_mask,
                      check_scan, random_like, window_mask)

L, D, H = 10, 4, 6
BIG = random_like(jnp.zeros((3 * L, D)), 7)       # 3L elements; X is its start
X = BIG[:L]
W = random_like(jnp.zeros((3, D, D)), 1) / 2
POS = random_like(jnp.zeros((L, D)), 2)          # a learned position table
SIZES = (1, 2, 5)                                # then "the rest"


# -- the families ----------------------------------------------------------
tril = causal_mask
window = window_mask


def attention(mask=tril, fill=-1e9, w=W):
  def f(x):
    q, k, v = x @ w[0], x @ w[1], x @ w[2]
    logits = jnp.einsum("td,sd->ts", q, k) * 0.5
    logits = jnp.where(mask(x.shape[0]), logits, fill)
    return jax.nn.softmax(logits, axis=-1) @ v
  return f


def attention_with_params(w, x):
  return x + attention(w=w)(x)


def attention_with_position_table(x):
  return attention()(x + POS[:x.shape[0]])


def lstm_params(seed=0):
  return random_like({"wx": jnp.zeros((D, 4 * H)), "wh": jnp.zeros((H, 4 * H)),
                      "b": jnp.zeros((4 * H,)), "out": jnp.zeros((H, D))},
                     seed)


def scan_lstm(params, xs):
  """A hand-written LSTM over lax.scan: xs [T, D] -> [T, D]."""
  def cell(hc, x):
    h, c = hc
    gates = x @ params["wx"] + h @ params["wh"] + params["b"]
    i, f, g, o = jnp.split(gates, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  hs = lax.scan(cell, (jnp.zeros(H), jnp.zeros(H)), xs)[1]
  return hs @ params["out"]


def _haiku_lstm(xs):                               # xs: [T, D], time-major
  core = hk.LSTM(H)
  hs, _ = hk.dynamic_unroll(core, xs[:, None], core.initial_state(1))
  return hk.Linear(D)(hs[:, 0])


HK_LSTM = hk.without_apply_rng(hk.transform(_haiku_lstm))
HK_LSTM_PARAMS = HK_LSTM.init(jax.random.key(3), X)
CONV_W = random_like((jnp.zeros((3, D, D)), jnp.zeros((2, D, D))), 4)


def causal_conv(x, w, dilation):
  reach = (w.shape[0] - 1) * dilation
  return lax.conv_general_dilated(
      x[None], w, (1,), [(reach, 0)], rhs_dilation=(dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"))[0]


def dilated_conv(x):
  h = jnp.tanh(causal_conv(x, CONV_W[0], 2))
  return x + causal_conv(h, CONV_W[1], 3)


def cumsum(x):
  return jnp.cumsum(jnp.tanh(x), axis=0) * 0.5 + x


def linear_step(left, right):
  return left[0] * right[0], right[0] * left[1] + right[1]


def linear_recurrence(x):
  """h_t = a_t h_{t-1} + b_t with an input-dependent decay a_t."""
  a = jax.nn.sigmoid(x @ W[0])
  return scanagram.associative_scan(linear_step, (a, x @ W[1]))[1]


LAYER_W = random_like(jnp.zeros((3, 3, D, D)), 5) / 2


def layers_of_attention(x):
  """lax.scan over 3 layers (stacked weights), the sequence in the carry."""
  def layer(h, w):
    return h + attention(w=w)(h), None
  return lax.scan(layer, x, LAYER_W)[0]


def layers_of_conv_and_cumsum(x):
  def layer(h, w):
    h = jnp.cumsum(h, 0) * 0.3 + causal_conv(h, w[:2], 2)
    return jnp.tanh(h), h.sum(-1)
  h, per_layer = lax.scan(layer, x, LAYER_W)
  return h, per_layer.T                            # per_layer: [layers, T]


def shifted(x, n=1):
  return jnp.pad(x, ((n, 0), (0, 0)))[:x.shape[0]]


def running_ahead(x):
  """A shifted input mixed with the input, and a pure shift as an output."""
  s = jnp.pad(x, ((1, 0), (0, 0)))[:-1]
  return {"mixed": x * jnp.tanh(s) + s, "shift2": shifted(x, 2)}


def attention_over_shifted(x):
  s = shifted(x)
  q, k, v = x @ W[0], s @ W[1], (x + s) @ W[2]
  logits = jnp.where(tril(x.shape[0]), q @ k.T, -jnp.inf)
  return jax.nn.softmax(logits, -1) @ v


def pytree_in_time_axis_1(xs):                    # both leaves [D, T]
  a, b = xs["a"].T, xs["b"].T
  return (jnp.cumsum(a * jnp.tanh(b), 0) + shifted(b)).T  # [D, T]


@dataclasses.dataclass
class Case:
  fun: Callable
  unscanned: Tuple = ()
  make_xs: Callable = lambda n: BIG[:n]            # the scanned input of length n
  in_axis: int = 0
  out_axis: int = 0
  bounded: Optional[bool] = None  # True: max_length == L; False: None
  tol: Any = None

  def to_step(self):
    in_axes = (None,) * len(self.unscanned) + (self.in_axis,)
    return scanagram.to_step(self.fun, *self.unscanned, self.make_xs(L),
                             in_axes=in_axes, out_axes=self.out_axis)

  def want(self, n=L):
    return self.fun(*self.unscanned, self.make_xs(n))


CASES = {
    "attention_full_1e9": Case(attention(fill=-1e9), bounded=True),
    "attention_full_inf": Case(attention(fill=-jnp.inf), bounded=True),
    "attention_params_as_input": Case(attention_with_params, (W,),
                                      bounded=True),
    "attention_position_table": Case(attention_with_position_table,
                                     bounded=True),
    "attention_window_3": Case(attention(window(3))),
    "attention_window_3_inf": Case(attention(window(3), -jnp.inf)),
    "attention_over_shifted": Case(attention_over_shifted, bounded=True),
    "lstm_haiku_dynamic_unroll": Case(HK_LSTM.apply, (HK_LSTM_PARAMS,),
                                      bounded=False),
    "lstm_lax_scan": Case(scan_lstm, (lstm_params(),), bounded=False),
    "dilated_causal_conv": Case(dilated_conv, bounded=False),
    "cumsum": Case(cumsum, bounded=False),
    "associative_scan": Case(linear_recurrence, bounded=False, tol=1e-4),
    "scan_over_layers_attention": Case(layers_of_attention, bounded=True,
                                       tol=1e-4),
    "scan_over_layers_conv_cumsum": Case(layers_of_conv_and_cumsum,
                                         bounded=False, tol=1e-4),
    "running_ahead": Case(running_ahead, bounded=False),
    "pytree_time_axis_1": Case(
        pytree_in_time_axis_1,
        make_xs=lambda n: {"a": BIG[:n].T, "b": jnp.sin(BIG[:n] * 2).T},
        in_axis=1, out_axis=1, bounded=False),
}
# unbounded, or either (the sliding windows): tested past L when None
UNBOUNDED = [name for name, c in CASES.items() if c.bounded is not True]


@pytest.fixture(scope="module")
def converted():
  """One to_step per case for the whole module (each k compiles once)."""
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = CASES[name].to_step()
    return cache[name]
  return get


# -- helpers -----------------------------------------------------------------
def blocks(start, stop=L, sizes=SIZES):
  """(start, k): sizes 1, 2, 5, then the rest, the last one clipped."""
  return _blocks(start, stop, sizes)


def take(tree, start, stop, axis):
  return jax.tree.map(
      lambda x: lax.slice_in_dim(x, start, stop, axis=axis % x.ndim), tree)


def element(tree, t, axis):
  return jax.tree.map(lambda x: jnp.take(x, t, axis=axis % x.ndim), tree)


def extend(fns, case, carry, start, k):
  block = take(case.make_xs(L), start, start + k, case.in_axis)
  return fns.extend(*case.unscanned, carry, block)


def stepper(fns, case):
  """(carry, x) -> (carry, y) for lax.scan, the unscanned arguments bound."""
  return lambda carry, x: fns.step(*case.unscanned, carry, x)


def scan_steps(fns, case, carry, start, stop, xs=None):
  xs = case.make_xs(L) if xs is None else xs
  elements = jax.tree.map(lambda x: jnp.moveaxis(x, case.in_axis % x.ndim, 0),
                          take(xs, start, stop, case.in_axis))
  carry, ys = lax.scan(stepper(fns, case), carry, elements)
  return carry, jax.tree.map(
      lambda y: jnp.moveaxis(y, 0, case.out_axis % y.ndim), ys)


def position(fns, carry):
  p = fns.positions(carry)
  assert np.shape(p) == () and jnp.dtype(p.dtype) == jnp.int32, p
  return int(p)


def all_nan(tree):
  return all(bool(jnp.isnan(y).all()) for y in jax.tree.leaves(tree)
             if jnp.issubdtype(y.dtype, jnp.floating))


def assert_positions_raise(call, length=L):
  with pytest.raises(ValueError) as info:
    jax.block_until_ready(call())
  message = str(info.value)
  assert "position" in message and str(length) in message, message


# -- extend at every position ------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_extend_at_every_position_equals_the_training_mode(name, converted):
  case, fns = CASES[name], converted(name)
  assert fns.length == L
  want = case.want()
  # the carry at every position, reached one element at a time
  carries = [fns.init(*case.unscanned)]
  for t in range(L):
    carry, ys = extend(fns, case, carries[-1], t, 1)
    assert_trees_close(ys, take(want, t, t + 1, case.out_axis), case.tol)
    assert position(fns, carry) == t + 1
    carries.append(carry)
  for s in range(L):
    carry = carries[s]
    for start, k in blocks(s):
      carry, ys = extend(fns, case, carry, start, k)
      try:
        assert_trees_close(ys, take(want, start, start + k, case.out_axis),
                           case.tol)
      except AssertionError as e:
        raise AssertionError(f"{name}: block of {k} at position {start} "
                             f"(first block at {s}): {e}") from None
      assert position(fns, carry) == start + k
    assert_trees_close(carry, carries[L], case.tol)


@pytest.mark.parametrize("name", list(CASES))
def test_extend_equals_a_scan_of_step(name, converted):
  """Same carry leaves and same outputs as lax.scan of step over the same
  elements, from init and from a prefill."""
  case, fns = CASES[name], converted(name)
  xs = case.make_xs(L)
  for p, k in [(0, 4), (3, 4), (3, L - 3)]:
    carry, out = fns.prefill(*case.unscanned, take(xs, 0, p, case.in_axis))
    assert position(fns, carry) == p
    by_steps, ys_steps = scan_steps(fns, case, carry, p, p + k)
    by_block, ys_block = extend(fns, case, carry, p, k)
    assert jax.tree.structure(by_block) == jax.tree.structure(by_steps)
    assert_trees_close(ys_block, ys_steps, case.tol)
    assert_trees_close(by_block, by_steps, case.tol)
    assert position(fns, by_block) == p + k


def test_extend_from_prefill_and_from_init_agree(converted):
  """prefill(xs[:p]) is extend from init by p elements: same carry."""
  case, fns = CASES["attention_params_as_input"], converted(
      "attention_params_as_input")
  xs = case.make_xs(L)
  for p in (1, 4, L):
    by_prefill, out_prefill = fns.prefill(W, xs[:p])
    by_extend, out_extend = fns.extend(W, fns.init(W), xs[:p])
    assert_trees_close(by_extend, by_prefill)
    assert_trees_close(out_extend, out_prefill)
    assert_trees_close(out_extend, case.want()[:p])


def test_positions_after_prefill_extend_and_step(converted):
  case, fns = CASES["lstm_lax_scan"], converted("lstm_lax_scan")
  params, xs = case.unscanned[0], case.make_xs(L)
  assert position(fns, fns.init(params)) == 0
  carry, _ = fns.prefill(params, xs[:3])
  assert position(fns, carry) == 3
  carry, ys = fns.extend(params, carry, xs[3:5])
  assert position(fns, carry) == 5
  assert ys.shape == (2, D)
  carry, y = fns.step(params, carry, xs[5])
  assert position(fns, carry) == 6
  assert y.shape == (D,)
  carry, ys = fns.extend(params, carry, xs[6:7])
  assert position(fns, carry) == 7
  assert ys.shape == (1, D)                        # k = 1 keeps its time axis
  assert_trees_close(ys[0], case.want()[6])
  # under jit and inside a scan the position is traced, and still counts
  carry, _ = jax.jit(fns.extend)(params, carry, xs[7:9])
  assert int(jax.jit(fns.positions)(carry)) == 9


def test_new_parameters_through_the_same_functions(converted):
  case, fns = CASES["attention_params_as_input"], converted(
      "attention_params_as_input")
  xs = case.make_xs(L)
  for seed in (11, 12):
    w = random_like(W, seed) / 2
    want = attention_with_params(w, xs)
    carry, out = fns.prefill(w, xs[:2])
    carry, ys = fns.extend(w, carry, xs[2:7])
    assert_trees_close(ys, want[2:7])
    carry, y = fns.step(w, carry, xs[7])
    assert_trees_close(y, want[7])


class _CompileCounter:
  """Counts XLA backend compilations (not their duration)."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


@pytest.mark.parametrize("name", ["attention_full_1e9", "attention_window_3",
                                  "dilated_causal_conv"])
def test_each_block_size_compiles_once(name):
  """A fresh to_step: the first extend by k compiles; extends by the same k
  at other positions reuse it (the position is traced, not static) and are
  right."""
  case = CASES[name]
  fns = case.to_step()
  want = case.want()
  carry = fns.init(*case.unscanned)
  carry, ys = extend(fns, case, carry, 0, 2)        # compiles for k = 2
  assert_trees_close(ys, want[0:2])
  carry, ys = extend(fns, case, carry, 2, 3)        # compiles for k = 3
  assert_trees_close(ys, want[2:5])
  # the blocks are cut first: slicing them compiles, extend must not
  blocks = {start: take(case.make_xs(L), start, start + 2, case.in_axis)
            for start in (5, 7)}
  jax.block_until_ready(blocks)
  with _CompileCounter() as counter:
    for start in (5, 7):
      carry, ys = fns.extend(*case.unscanned, carry, blocks[start])
      assert_trees_close(ys, want[start:start + 2])
  assert counter.count == 0, (
      f"extend by 2 at positions 5 and 7 compiled {counter.count} time(s)")
  with _CompileCounter() as counter:
    carry, _ = fns.prefill(*case.unscanned, case.make_xs(L)[:2])
    carry, ys = extend(fns, case, carry, 2, 3)
    assert_trees_close(ys, want[2:5])
  # the prefill of 2 may compile once; extend by 3 must not compile again
  assert counter.count <= 1, counter.count


@pytest.mark.parametrize("name", ["attention_full_inf", "attention_window_3",
                                  "cumsum", "running_ahead",
                                  "scan_over_layers_conv_cumsum"])
def test_check_scan_blocks(name):
  """conftest.check_scan (used across the suite) with its extend checks, on
  outputs that are pytrees and leaves of rank 1."""
  case = CASES[name]
  check_scan(case.fun, X, prefill_lengths=[0, 3, L], tol=case.tol)


def test_check_scan_blocks_with_pytree_inputs():
  xs = {"a": X, "b": (jnp.sin(X), jnp.cos(X[:, :2]))}
  check_scan(lambda xs: {"y": jnp.cumsum(xs["a"] * xs["b"][0], 0),
                         "z": shifted(xs["b"][1], 2)}, xs)


# -- past L --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_max_length(name, converted):
  case, fns = CASES[name], converted(name)
  assert fns.length == L
  if case.bounded is True:
    assert fns.max_length == L
  elif case.bounded is False:
    assert fns.max_length is None
  else:                                            # either is sound
    assert fns.max_length in (None, L)


@pytest.mark.parametrize("name", ["attention_full_1e9",
                                  "attention_position_table",
                                  "attention_params_as_input"])
def test_step_past_L_raises_eagerly(name, converted):
  case, fns = CASES[name], converted(name)
  xs = case.make_xs(L)
  carry, _ = fns.prefill(*case.unscanned, xs)      # position L
  assert position(fns, carry) == L
  x = element(xs, 0, case.in_axis)
  assert_positions_raise(lambda: fns.step(*case.unscanned, carry, x))
  # one step before L is still fine
  carry, _ = fns.prefill(*case.unscanned, take(xs, 0, L - 1, case.in_axis))
  carry, y = fns.step(*case.unscanned, carry, element(xs, L - 1, case.in_axis))
  assert_trees_close(y, element(case.want(), L - 1, case.out_axis))
  assert_positions_raise(lambda: fns.step(*case.unscanned, carry, x))


@pytest.mark.parametrize("name", ["attention_full_1e9",
                                  "attention_position_table"])
def test_extend_and_prefill_crossing_L_raise_eagerly(name, converted):
  case, fns = CASES[name], converted(name)
  xs = case.make_xs(L)
  carry, _ = fns.prefill(take(xs, 0, L - 2, case.in_axis))
  assert_positions_raise(lambda: extend(fns, case, carry, 0, 3))
  assert_positions_raise(lambda: extend(fns, case, carry, 0, L))
  carry, ys = extend(fns, case, carry, L - 2, 2)   # exactly up to L: fine
  assert_trees_close(ys, take(case.want(), L - 2, L, case.out_axis))
  assert position(fns, carry) == L
  assert_positions_raise(lambda: extend(fns, case, carry, 0, 1))
  longer = jnp.concatenate([xs, xs[:1]], case.in_axis)     # L + 1 elements
  assert_positions_raise(lambda: fns.prefill(longer))


@pytest.mark.parametrize("name", ["attention_full_1e9",
                                  "attention_position_table",
                                  "scan_over_layers_attention"])
def test_past_L_under_jit_is_nan(name, converted):
  case, fns = CASES[name], converted(name)
  xs, want = case.make_xs(L), case.want()
  carry, _ = fns.prefill(xs)
  carry_past, y = jax.jit(fns.step)(carry, xs[0])   # position L
  assert all_nan(y), y
  _, y = jax.jit(fns.step)(carry_past, xs[1])       # position L + 1
  assert all_nan(y), y
  # a scan of the step over 2L elements: right up to L, NaN after
  _, ys = lax.scan(fns.step, fns.init(), jnp.concatenate([xs, xs]))
  assert_trees_close(ys[:L], want, case.tol)
  assert all_nan(ys[L:]), ys[L:]
  # a jitted extend crossing L (k > L - position, outside the contract):
  # NaN from L on
  carry, _ = fns.prefill(xs[:L - 2])
  _, ys = jax.jit(fns.extend)(carry, jnp.concatenate([xs[L - 2:], xs[:2]]))
  assert all_nan(ys[2:]), ys


@pytest.mark.parametrize("name", UNBOUNDED)
def test_unbounded_steps_to_3L_like_the_training_mode_at_3L(name, converted):
  """Converted at L, stepped to 3L: equals fun on the 3L-long sequence."""
  case, fns = CASES[name], converted(name)
  if case.bounded is None and fns.max_length is not None:
    pytest.skip(f"max_length is {fns.max_length}: bounded, which is sound")
  assert fns.max_length is None
  xs3 = case.make_xs(3 * L)
  want3 = case.want(3 * L)
  tol = 1e-4 if case.tol is None else case.tol
  carry, ys = scan_steps(fns, case, fns.init(*case.unscanned), 0, 3 * L, xs3)
  assert_trees_close(ys, want3, tol)
  assert position(fns, carry) == 3 * L


def _unbounded(name, converted):
  """The case, its functions (skipped when they are bounded, which is
  sound), 3L inputs, the training mode on them and the tolerance."""
  case, fns = CASES[name], converted(name)
  if case.bounded is None and fns.max_length is not None:
    pytest.skip(f"max_length is {fns.max_length}: bounded, which is sound")
  tol = 1e-4 if case.tol is None else case.tol
  return case, fns, case.make_xs(3 * L), case.want(3 * L), tol


@pytest.mark.parametrize("name", UNBOUNDED)
def test_unbounded_full_prefill_then_eager_steps_past_L(name, converted):
  """A prompt of exactly L elements, then eager steps at L, L + 1, L + 2: no
  refusal, and the state (delay lines included) carries on."""
  case, fns, xs3, want3, tol = _unbounded(name, converted)
  carry, _ = fns.prefill(*case.unscanned, take(xs3, 0, L, case.in_axis))
  for t in range(L, L + 3):
    carry, y = fns.step(*case.unscanned, carry, element(xs3, t, case.in_axis))
    assert_trees_close(y, element(want3, t, case.out_axis), tol)
  assert position(fns, carry) == L + 3


@pytest.mark.parametrize("name", UNBOUNDED)
def test_unbounded_extend_past_L(name, converted):
  """Blocks of k <= L across and past L, for a model that steps on."""
  case, fns, xs3, want3, tol = _unbounded(name, converted)
  carry, _ = fns.prefill(*case.unscanned, take(xs3, 0, L - 3, case.in_axis))
  for start, k in [(L - 3, 5), (L + 2, 5), (L + 7, L), (2 * L + 7, 1)]:
    block = take(xs3, start, start + k, case.in_axis)
    carry, ys = fns.extend(*case.unscanned, carry, block)
    assert_trees_close(ys, take(want3, start, start + k, case.out_axis), tol)
    assert position(fns, carry) == start + k
