"""Independent rows: ``batch_axes`` / ``out_batch_axes`` and ragged lengths.

Models are written batch-major (xs: [B, T, D], time axis 1, rows along 0).
With ``batch_axes`` each row has its own position; ``prefill`` and ``extend``
take right-padded inputs and per-row ``lengths`` (0 allowed); outputs at a
row's padded positions are exactly 0; row b's outputs equal the training
mode run on row b's own sequence; a function that mixes rows is refused.
"""
import dataclasses
from typing import Any, Callable, Tuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import (assert_trees_close, causal_mask, random_like,
                      window_mask)

B, L, D, H, S = 4, 8, 4, 5, 3
XS = random_like(jnp.zeros((B, L, D)), 0)
W = random_like(jnp.zeros((3, D, D)), 1) / 2
POS = random_like(jnp.zeros((L, D)), 2)
ENC = random_like(jnp.zeros((B, S, D)), 3)       # an encoder's output per row


# -- the models (batch-major) --------------------------------------------------
tril = causal_mask
window = window_mask


def attention(mask=tril, fill=-1e9, w=W):
  def f(xs):
    q, k, v = xs @ w[0], xs @ w[1], xs @ w[2]
    logits = jnp.einsum("btd,bsd->bts", q, k) * 0.5
    logits = jnp.where(mask(xs.shape[1])[None], logits, fill)
    return jnp.einsum("bts,bsd->btd", jax.nn.softmax(logits, -1), v)
  return f


def attention_with_position_table(xs):
  return attention()(xs + POS[:xs.shape[1]])


def cross_attention(enc, xs):
  """Causal self-attention, then attention to this row's encoder output."""
  h = xs + attention(fill=-jnp.inf)(xs)
  q, k, v = h @ W[0], enc @ W[1], enc @ W[2]
  weights = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k), -1)
  return h + jnp.einsum("bts,bsd->btd", weights, v)


def _haiku_lstm(xs):
  core = hk.LSTM(H)
  hs, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[0]),
                            time_major=False)
  return hk.Linear(D)(hs)


HK_LSTM = hk.without_apply_rng(hk.transform(_haiku_lstm))
HK_LSTM_PARAMS = HK_LSTM.init(jax.random.key(4), XS)
LSTM_PARAMS = random_like({"wx": jnp.zeros((D, 4 * H)),
                           "wh": jnp.zeros((H, 4 * H)),
                           "b": jnp.zeros((4 * H,)),
                           "out": jnp.zeros((H, D))}, 5)


def scan_lstm(params, xs):
  """A hand-written LSTM over lax.scan along time, rows in the carry."""
  def cell(hc, x):                                  # x: [B, D]
    h, c = hc
    gates = x @ params["wx"] + h @ params["wh"] + params["b"]
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  zeros = jnp.zeros((xs.shape[0], H))
  hs = lax.scan(cell, (zeros, zeros), jnp.swapaxes(xs, 0, 1))[1]
  return jnp.swapaxes(hs, 0, 1) @ params["out"]


CONV_W = random_like((jnp.zeros((3, D, D)), jnp.zeros((2, D, D))), 6)


def causal_conv(xs, w, dilation):
  reach = (w.shape[0] - 1) * dilation
  return lax.conv_general_dilated(
      xs, w, (1,), [(reach, 0)], rhs_dilation=(dilation,),
      dimension_numbers=("NWC", "WIO", "NWC"))


def dilated_conv(xs):
  return xs + causal_conv(jnp.tanh(causal_conv(xs, CONV_W[0], 2)),
                          CONV_W[1], 3)


def cumsum(xs):
  return jnp.cumsum(jnp.tanh(xs), axis=1) * 0.5 + xs


def linear_step(left, right):
  return left[0] * right[0], right[0] * left[1] + right[1]


def linear_recurrence(xs):
  a = jax.nn.sigmoid(xs @ W[0])
  return scanagram.associative_scan(linear_step, (a, xs @ W[1]), axis=1)[1]


LAYER_W = random_like(jnp.zeros((2, 3, D, D)), 7) / 2


def layers_of_attention_and_conv(xs):
  def layer(h, w):
    h = h + attention(w=w)(h)
    return h + jnp.tanh(causal_conv(h, w[:2], 1)), None
  return lax.scan(layer, xs, LAYER_W)[0]


def running_ahead(xs):
  s = jnp.pad(xs, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  return {"mixed": xs * jnp.tanh(s) + s, "cumsum": jnp.cumsum(s, axis=1)}


@dataclasses.dataclass
class Case:
  fun: Callable
  unscanned: Tuple = ()
  unscanned_rows: Tuple = ()   # batch axis of each unscanned argument
  tol: Any = None
  bounded: Any = None          # True: max_length == L

  def to_step(self):
    n = len(self.unscanned)
    return scanagram.to_step(
        self.fun, *self.unscanned, XS, in_axes=(None,) * n + (1,), out_axes=1,
        batch_axes=tuple(self.unscanned_rows) + (0,), out_batch_axes=0)

  def row_args(self, b):
    """The unscanned arguments as seen by row b alone."""
    return tuple(a if r is None else jax.tree.map(
        lambda x: lax.slice_in_dim(x, b, b + 1, axis=r), a)
        for a, r in zip(self.unscanned, self.unscanned_rows))

  def want_row(self, b, seq):
    """fun on row b's own sequence seq [n, D] (padded to L): [L, ...]."""
    padded = jnp.zeros((L, D)).at[:seq.shape[0]].set(seq)
    return jax.tree.map(lambda y: y[0],
                        self.fun(*self.row_args(b), padded[None]))


def blockwise_online(xs):
  """Block-wise attention (blocks of 3 over L = 8, padded to 9; the online
  softmax): its prefill of a long prompt runs in blocks of 3."""
  from test_blockwise import blockwise_attention
  return jax.vmap(lambda x: blockwise_attention(
      x[:, None], x[:, None], jnp.tanh(x)[:, None], 3,
      lambda i, j: i >= j, "online")[:, 0])(xs)


CASES = {
    "attention_full": Case(attention(), bounded=True),
    "attention_full_inf": Case(attention(fill=-jnp.inf)),
    "attention_window_3": Case(attention(window(3))),
    "attention_position_table": Case(attention_with_position_table,
                                     bounded=True),
    "cross_attention_encoder_rows": Case(cross_attention, (ENC,), (0,)),
    "lstm_haiku_dynamic_unroll": Case(HK_LSTM.apply, (HK_LSTM_PARAMS,),
                                      (None,)),
    "lstm_lax_scan": Case(scan_lstm, (LSTM_PARAMS,), (None,)),
    "dilated_causal_conv": Case(dilated_conv),
    "cumsum": Case(cumsum),
    "associative_scan": Case(linear_recurrence, tol=1e-4),
    "scan_over_layers": Case(layers_of_attention_and_conv, tol=1e-4),
    "running_ahead": Case(running_ahead),
}
# checked by the ragged prefill only (its prefill runs in blocks of 3)
BLOCKWISE = {"attention_blockwise": Case(blockwise_online, bounded=True)}


@pytest.fixture(scope="module")
def converted():
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = {**CASES, **BLOCKWISE}[name].to_step()
    return cache[name]
  return get


# -- helpers -----------------------------------------------------------------
def pad_rows(block, lengths, seed):
  """Right-padding: row b keeps its first lengths[b] elements; the rest is
  garbage (finite, far from the data) that must not matter."""
  t = jnp.arange(block.shape[1])[None, :, None]
  garbage = 7.0 + 3.0 * random_like(block, seed)
  return jnp.where(t < jnp.asarray(lengths)[:, None, None], block, garbage)


def as_lengths(lengths):
  return jnp.asarray(lengths, jnp.int32)


def positions(fns, carry):
  p = fns.positions(carry)
  assert np.shape(p) == (B,) and jnp.dtype(p.dtype) == jnp.int32, p
  return np.asarray(p).tolist()


def check_rows(name, ys, lengths, starts, wants, tol):
  """Row b of ``ys`` (time axis 1): wants[b] at positions starts[b] ..
  starts[b] + lengths[b] - 1, then exactly 0."""
  for b in range(B):
    n, s = int(lengths[b]), int(starts[b])
    got_b = jax.tree.map(lambda y: y[b], ys)
    try:
      assert_trees_close(jax.tree.map(lambda y: y[:n], got_b),
                         jax.tree.map(lambda y: y[s:s + n], wants[b]), tol)
    except AssertionError as e:
      raise AssertionError(f"{name}, row {b} (positions {s}..{s + n - 1}): "
                           f"{e}") from None
    for leaf in jax.tree.leaves(got_b):
      padded = np.asarray(leaf)[n:]
      assert (padded == 0).all(), (
          f"{name}, row {b}: outputs at padded positions {n}.. are not 0: "
          f"{padded}")


# -- ragged prefill ----------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES) + list(BLOCKWISE))
def test_prefill_ragged_rows_equal_each_row_alone(name, converted):
  case, fns = {**CASES, **BLOCKWISE}[name], converted(name)
  assert fns.length == L
  init = fns.init(*case.unscanned)
  assert positions(fns, init) == [0] * B
  for prompt_len, lengths in [(L, [0, 3, L, 5]), (5, [2, 0, 5, 4])]:
    block = pad_rows(XS[:, :prompt_len], lengths, 10 + prompt_len)
    carry, ys = fns.prefill(*case.unscanned, block,
                            lengths=as_lengths(lengths))
    assert positions(fns, carry) == lengths
    for leaf in jax.tree.leaves(ys):
      assert leaf.shape[:2] == (B, prompt_len), leaf.shape
    wants = [case.want_row(b, XS[b, :lengths[b]]) for b in range(B)]
    check_rows(name, ys, lengths, [0] * B, wants, case.tol)


@pytest.mark.parametrize("name", ["attention_full", "lstm_lax_scan",
                                  "running_ahead"])
def test_rows_without_lengths_all_advance(name, converted):
  """With batch_axes and lengths=None every row takes the whole block."""
  case, fns = CASES[name], converted(name)
  want = case.fun(*case.unscanned, XS)
  carry, ys = fns.prefill(*case.unscanned, XS[:, :3])
  assert positions(fns, carry) == [3] * B
  assert_trees_close(ys, jax.tree.map(lambda y: y[:, :3], want), case.tol)
  carry, ys = fns.extend(*case.unscanned, carry, XS[:, 3:5])
  assert positions(fns, carry) == [5] * B
  assert_trees_close(ys, jax.tree.map(lambda y: y[:, 3:5], want), case.tol)
  carry, y = fns.step(*case.unscanned, carry, XS[:, 5])
  assert positions(fns, carry) == [6] * B
  assert_trees_close(y, jax.tree.map(lambda y: y[:, 5], want), case.tol)


@pytest.mark.parametrize("name", ["attention_full", "dilated_causal_conv",
                                  "cross_attention_encoder_rows"])
def test_steps_from_init_equal_the_training_mode(name, converted):
  case, fns = CASES[name], converted(name)
  want = case.fun(*case.unscanned, XS)
  step = lambda carry, x: fns.step(*case.unscanned, carry, x)
  carry, ys = lax.scan(step, fns.init(*case.unscanned), jnp.swapaxes(XS, 0, 1))
  assert_trees_close(jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), ys), want,
                     case.tol)
  assert positions(fns, carry) == [L] * B


# -- several turns ---------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_prefill_extend_step_extend_ragged(name, converted):
  """Multi-turn: a ragged prefill, a ragged extend on the carry, one step of
  every row, another ragged extend; each row equals the training mode on
  its own concatenated sequence."""
  case, fns = CASES[name], converted(name)
  tol = case.tol
  l1, l2, l3 = [0, 4, 2, 2], [3, 0, 1, 3], [2, 1, 0, 2]   # rows end at 6, 6, 4, 8
  prompt = random_like(jnp.zeros((B, 4, D)), 20)
  turn2 = random_like(jnp.zeros((B, 3, D)), 21)
  x = random_like(jnp.zeros((B, D)), 22)
  turn3 = random_like(jnp.zeros((B, 2, D)), 23)
  seqs = [jnp.concatenate([prompt[b, :l1[b]], turn2[b, :l2[b]], x[b][None],
                           turn3[b, :l3[b]]]) for b in range(B)]
  wants = [case.want_row(b, seqs[b]) for b in range(B)]

  carry, ys = fns.prefill(*case.unscanned, pad_rows(prompt, l1, 30),
                          lengths=as_lengths(l1))
  check_rows(name + " prefill", ys, l1, [0] * B, wants, tol)
  assert positions(fns, carry) == l1

  carry, ys = fns.extend(*case.unscanned, carry, pad_rows(turn2, l2, 31),
                         lengths=as_lengths(l2))
  check_rows(name + " extend", ys, l2, l1, wants, tol)
  at = [a + b for a, b in zip(l1, l2)]
  assert positions(fns, carry) == at

  carry, y = fns.step(*case.unscanned, carry, x)
  for b in range(B):
    assert_trees_close(jax.tree.map(lambda v: v[b], y),
                       jax.tree.map(lambda v: v[at[b]], wants[b]), tol)
  at = [a + 1 for a in at]
  assert positions(fns, carry) == at

  carry, ys = fns.extend(*case.unscanned, carry, pad_rows(turn3, l3, 32),
                         lengths=as_lengths(l3))
  check_rows(name + " second extend", ys, l3, at, wants, tol)
  assert positions(fns, carry) == [a + b for a, b in zip(at, l3)]


def test_extend_with_lengths_under_jit(converted):
  """lengths are traced: one jitted extend serves every lengths vector."""
  case, fns = CASES["attention_window_3"], converted("attention_window_3")
  extend = jax.jit(fns.extend)
  turns = [([1, 3, 0, 2], 40), ([3, 0, 2, 3], 41), ([2, 2, 3, 0], 42)]
  blocks = [random_like(jnp.zeros((B, 3, D)), seed) for _, seed in turns]
  seqs = [jnp.concatenate([blk[b, :n[b]] for blk, (n, _) in zip(blocks, turns)])
          for b in range(B)]
  wants = [case.want_row(b, seqs[b]) for b in range(B)]
  carry, done = fns.init(), [0] * B
  for block, (lengths, seed) in zip(blocks, turns):
    carry, ys = extend(carry, pad_rows(block, lengths, seed + 10),
                       lengths=as_lengths(lengths))
    check_rows("jit extend", ys, lengths, done, wants, case.tol)
    done = [d + n for d, n in zip(done, lengths)]
  assert positions(fns, carry) == done


@pytest.mark.parametrize("name", ["attention_full", "attention_position_table"])
def test_padding_may_run_past_L_but_not_a_row(name, converted):
  """Bounded models: a row at L - 1 may take a block of 3 with length 1 (its
  padded positions are not computed); with length 2 it would compute
  position L, which is refused eagerly."""
  case, fns = CASES[name], converted(name)
  assert fns.max_length == L
  lengths = [L - 1, 2, 0, L - 3]
  carry, _ = fns.prefill(pad_rows(XS, lengths, 50), lengths=as_lengths(lengths))
  block = random_like(jnp.zeros((B, 3, D)), 51)
  with pytest.raises(ValueError) as info:
    fns.extend(carry, block, lengths=as_lengths([2, 1, 0, 1]))
  assert "position" in str(info.value) and str(L) in str(info.value)
  more = [1, 3, 3, 3]
  carry, ys = fns.extend(carry, pad_rows(block, more, 52),
                         lengths=as_lengths(more))
  assert positions(fns, carry) == [L, 5, 3, L]
  seqs = [jnp.concatenate([XS[b, :lengths[b]], block[b, :more[b]]])
          for b in range(B)]
  check_rows(name, ys, more, lengths,
             [case.want_row(b, seqs[b]) for b in range(B)], case.tol)


def test_a_row_of_length_zero_keeps_its_carry(converted):
  case, fns = CASES["lstm_lax_scan"], converted("lstm_lax_scan")
  params = case.unscanned[0]
  carry, _ = fns.prefill(params, XS[:, :4], lengths=as_lengths([4, 2, 0, 3]))
  after, ys = fns.extend(params, carry, pad_rows(XS[:, 4:7], [0, 0, 0, 0], 40),
                         lengths=as_lengths([0, 0, 0, 0]))
  assert (np.asarray(ys) == 0).all()
  assert_trees_close(after, carry, 0)


# -- refusals ------------------------------------------------------------------
def refused(fun, *any_of):
  """to_step with batch_axes raises ScanConversionError naming one of
  ``any_of`` and this file (the user's source line); without batch_axes the
  same function converts (rows are then just another axis)."""
  scanagram.to_step(fun, XS, in_axes=1, out_axes=1)
  with pytest.raises(scanagram.ScanConversionError) as info:
    scanagram.to_step(fun, XS, in_axes=1, out_axes=1, batch_axes=0,
                      out_batch_axes=0)
  message = str(info.value)
  assert any(op in message for op in any_of), message
  assert "test_rows.py" in message, message
  return message


def test_mean_over_rows_is_refused():
  refused(lambda xs: xs - xs.mean(0, keepdims=True), "reduce_sum")


def test_batch_statistics_are_refused():
  def batch_norm(xs):
    mean = xs.mean(0, keepdims=True)
    var = ((xs - mean) ** 2).mean(0, keepdims=True)
    return (xs - mean) * lax.rsqrt(var + 1e-5)
  refused(batch_norm, "reduce_sum")


def test_cumsum_over_rows_is_refused():
  refused(lambda xs: jnp.cumsum(xs, axis=0), "cumsum")


def test_attention_along_rows_is_refused():
  def rows_attend(xs):                              # row b attends to rows c
    logits = jnp.einsum("btd,ctd->tbc", xs @ W[0], xs @ W[1])
    weights = jax.nn.softmax(logits, -1)
    return jnp.einsum("tbc,ctd->btd", weights, xs @ W[2])
  refused(rows_attend, "dot_general", "reduce_max", "reduce_sum", "exp")


def test_reversing_rows_is_refused():
  refused(lambda xs: xs + xs[::-1], "rev")


def test_lengths_without_batch_axes_is_a_type_error():
  fns = scanagram.to_step(cumsum, XS, in_axes=1, out_axes=1)
  with pytest.raises(TypeError):
    fns.prefill(XS[:, :3], lengths=as_lengths([1, 2, 3, 0]))
  carry, _ = fns.prefill(XS[:, :3])
  with pytest.raises(TypeError):
    fns.extend(carry, XS[:, 3:5], lengths=as_lengths([1, 2, 2, 0]))
  assert int(fns.positions(carry)) == 3           # one position for all rows


def test_time_major_rows_step_keeps_rows_first():
  """xs [T, B, D] with batch_axes=1: a step's output is [B, D] (the time
  axis removed before the rows), and each row continues its own sequence."""
  def fun(xs):                                      # [T, B, D]
    return jnp.cumsum(jnp.tanh(xs), axis=0) * 2
  xs = random_like(jnp.zeros((L, B, D + 1)), 11)   # D + 1 != B
  fns = scanagram.to_step(fun, xs, in_axes=0, out_axes=0, batch_axes=1,
                          out_batch_axes=1)
  lengths = np.array([2, 0, 1] + [1] * (B - 3))[:B]
  carry, _ = fns.prefill(xs[:2], lengths=lengths)
  carry, y = fns.step(carry, xs[2])
  assert y.shape == (B, D + 1)
  for b, n in enumerate(lengths):
    seq = jnp.concatenate([xs[:n, b], xs[2:3, b]])[:, None]
    assert_trees_close(y[b], fun(seq)[-1, 0])
