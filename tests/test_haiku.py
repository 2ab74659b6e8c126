"""adapters.haiku: Haiku models as prefill / step / generate.

Every model is a small token model ``ids -> logits`` around the module under
test, so that greedy generation can feed outputs back as inputs.
"""
import collections
import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanagram
from adapters.haiku import StepPair, Stepper, to_step
from conftest import assert_trees_close

B, L, D, V = 2, 6, 8, 7
TRACES = collections.Counter()


def greedy(rng, logits):
  del rng
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


# -- the models ----------------------------------------------------------------
def _embed(ids):
  return hk.Embed(V, D)(ids)


def _head(x):
  return hk.Linear(V)(x)


def _unroll(core, x, time_major):
  batch = x.shape[1] if time_major else x.shape[0]
  return hk.dynamic_unroll(core, x, core.initial_state(batch),
                           time_major=time_major)[0]


def _residual_block(x):
  return x + hk.nets.MLP([16, D])(jax.nn.gelu(x))


def _gpt_block(ids):
  x = _embed(ids)
  pos = hk.get_parameter("position", [L, D],
                         init=hk.initializers.RandomNormal())
  t = ids.shape[1]
  x = x + pos[jnp.arange(t)]
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  x = x + hk.MultiHeadAttention(
      num_heads=2, key_size=4, w_init=hk.initializers.VarianceScaling())(
          h, h, h, mask=mask)
  h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  return _head(x + hk.nets.MLP([16, D])(h))


def _position_embedding(ids):
  pos = hk.get_parameter("position", [L, D],
                         init=hk.initializers.RandomNormal())
  return _head(_embed(ids) + pos[jnp.arange(ids.shape[1])])


BODIES = {
    "embed_linear": lambda x: x,
    "mlp": lambda x: hk.nets.MLP([16, D])(x),
    "layer_norm": lambda x: hk.LayerNorm(-1, True, True)(x),
    "rms_norm": lambda x: hk.RMSNorm(-1)(x),
    "conv1d_causal": lambda x: hk.Conv1D(D, 3, padding=hk.pad.causal)(x),
    "conv1d_dilated": lambda x: hk.Conv1D(D, 2, rate=2,
                                          padding=hk.pad.causal)(x),
    "conv1d_depthwise": lambda x: hk.Conv1D(
        D, 3, feature_group_count=D, padding=hk.pad.causal)(x),
    "lstm_batch_major": lambda x: _unroll(hk.LSTM(D), x, False),
    "gru_batch_major": lambda x: _unroll(hk.GRU(D), x, False),
    "vanilla_rnn_batch_major": lambda x: _unroll(hk.VanillaRNN(D), x, False),
    "deep_rnn_batch_major": lambda x: _unroll(
        hk.DeepRNN([hk.LSTM(D), jax.nn.relu, hk.GRU(D)]), x, False),
    "layer_stack": lambda x: hk.layer_stack(2)(_residual_block)(x),
    "remat": lambda x: hk.remat(_residual_block)(x),
}
TIME_MAJOR_BODIES = {
    "lstm_time_major": lambda x: _unroll(hk.LSTM(D), x, True),
    "deep_rnn_time_major": lambda x: _unroll(
        hk.DeepRNN([hk.VanillaRNN(D), hk.GRU(D)]), x, True),
}


def _token_model(name, body):
  def forward(ids):
    TRACES[name] += 1
    return _head(body(_embed(ids)))
  return forward


def _counted(name, forward):
  def counted(ids):
    TRACES[name] += 1
    return forward(ids)
  return counted


def _batch_norm(ids, is_training=False):
  TRACES["batch_norm"] += 1
  x = hk.BatchNorm(True, True, 0.9)(_embed(ids), is_training=is_training)
  return _head(x)


Case = collections.namedtuple(
    "Case", "name model axis pair params state params2")


def _ids(axis, seed):
  shape = (L, B) if axis == 0 else (B, L)
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def _positive_state(state, seed):
  """BatchNorm moving averages with a positive variance, not the defaults."""
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      0.5 + jnp.abs(jax.random.normal(k, x.shape, x.dtype))
      if jnp.issubdtype(x.dtype, jnp.floating) else x
      for k, x in zip(keys, leaves)])


def _build(name):
  if name == "batch_norm":
    model = hk.transform_with_state(_batch_norm)
    ids = _ids(1, 0)
    params, state = model.init(jax.random.key(0), ids, is_training=True)
    params2, _ = model.init(jax.random.key(1), ids, is_training=True)
    state = _positive_state(state, 2)
    pair = to_step(model, ids, axis=1, params=params, state=state)
    return Case(name, model, 1, pair, params, state, params2)
  if name in BODIES:
    forward, axis = _token_model(name, BODIES[name]), 1
  elif name in TIME_MAJOR_BODIES:
    forward, axis = _token_model(name, TIME_MAJOR_BODIES[name]), 0
  else:
    forward = _counted(name, {"position_embedding": _position_embedding,
                              "gpt_block": _gpt_block}[name])
    axis = 1
  model = hk.transform(forward)
  ids = _ids(axis, 0)
  params = model.init(jax.random.key(0), ids)
  params2 = model.init(jax.random.key(1), ids)
  pair = to_step(model, ids, axis=axis)
  return Case(name, model, axis, pair, params, None, params2)


NAMES = (list(BODIES) + list(TIME_MAJOR_BODIES) +
         ["position_embedding", "batch_norm", "gpt_block"])


@functools.lru_cache(maxsize=None)
def _case(name):
  return _build(name)


@pytest.fixture(params=NAMES)
def case(request):
  return _case(request.param)


def _unscanned(case, params=None):
  params = case.params if params is None else params
  return (params,) if case.state is None else (params, case.state)


def _apply(case, ids, params=None):
  """The model on a whole sequence: the reference."""
  u = _unscanned(case, params)
  if case.state is None:
    return case.model.apply(u[0], None, ids)
  return case.model.apply(u[0], u[1], None, ids)[0]


def _take(x, t, axis):
  return jnp.take(x, t, axis=axis)


def _slice(x, start, stop, axis):
  return jax.lax.slice_in_dim(x, start, stop, axis=axis)


def _steps(pair, unscanned, carry, ids, start, axis):
  ys = []
  for t in range(start, L):
    carry, y = pair.step(*unscanned, carry, _take(ids, t, axis))
    ys.append(y)
  return carry, ys


# -- equality with the model ---------------------------------------------------
def test_steps_from_init_equal_the_model(case):
  ids = _ids(case.axis, 3)
  want = _apply(case, ids)
  u = _unscanned(case)
  _, ys = _steps(case.pair, u, case.pair.init(*u), ids, 0, case.axis)
  assert_trees_close(jnp.stack(ys, case.axis), want, tol=1e-4)


@pytest.mark.parametrize("p", [1, L // 2, L])
def test_prefill_then_steps_equal_the_model(case, p):
  ids = _ids(case.axis, 4)
  want = _apply(case, ids)
  u = _unscanned(case)
  carry, out = case.pair.prefill(*u, _slice(ids, 0, p, case.axis))
  assert_trees_close(out, _slice(want, 0, p, case.axis), tol=1e-4)
  _, ys = _steps(case.pair, u, carry, ids, p, case.axis)
  if ys:
    assert_trees_close(jnp.stack(ys, case.axis),
                       _slice(want, p, L, case.axis), tol=1e-4)


def test_stepper_equals_the_model(case):
  ids = _ids(case.axis, 5)
  want = _apply(case, ids)
  stepper = case.pair.bind(*_unscanned(case))
  assert stepper.reset() is None and stepper.position == 0
  ys = [stepper(_take(ids, t, case.axis)) for t in range(L)]
  assert_trees_close(jnp.stack(ys, case.axis), want, tol=1e-4)
  p = 2
  out = stepper.reset(_slice(ids, 0, p, case.axis))
  assert stepper.position == p
  ys = [stepper(_take(ids, t, case.axis)) for t in range(p, L)]
  assert_trees_close(jnp.concatenate([out, jnp.stack(ys, case.axis)],
                                     case.axis), want, tol=1e-4)


def test_new_params_same_compiled_step(case):
  ids = _ids(case.axis, 6)
  pair = case.pair
  u, u2 = _unscanned(case), _unscanned(case, case.params2)
  carry, _ = pair.prefill(*u, _slice(ids, 0, 2, case.axis))
  pair.step(*u, carry, _take(ids, 2, case.axis))             # compiled now
  traces, pair_traces = TRACES[case.name], dict(pair.trace_counts)

  carry2, out2 = pair.prefill(*u2, _slice(ids, 0, 2, case.axis))
  _, y2 = pair.step(*u2, carry2, _take(ids, 2, case.axis))
  _, y1 = pair.step(*u, carry, _take(ids, 2, case.axis))

  assert TRACES[case.name] == traces          # the model was not re-traced
  assert dict(pair.trace_counts) == pair_traces  # nor prefill nor step
  want2 = _apply(case, ids, case.params2)
  assert_trees_close(out2, _slice(want2, 0, 2, case.axis), tol=1e-4)
  assert_trees_close(y2, _take(want2, 2, case.axis), tol=1e-4)
  assert not np.allclose(y1, y2)


def test_generate_greedy_equals_rerunning_the_model(case):
  p, steps = 2, L - 1                      # uses every position: P + steps - 1 = L
  prompt = _slice(_ids(case.axis, 7), 0, p, case.axis)
  got = case.pair.generate(*_unscanned(case), prompt, steps, greedy,
                           jax.random.key(0))
  apply = jax.jit(lambda ids: _apply(case, ids))
  seq, want = prompt, []
  for _ in range(steps):
    # right-padded to L (the model is causal): one compile for every length
    n, axis = seq.shape[case.axis], case.axis % seq.ndim
    padded = jnp.pad(seq, [(0, L - n) if d == axis else (0, 0)
                           for d in range(seq.ndim)])
    x = greedy(None, _take(apply(padded), n - 1, case.axis))
    want.append(x)
    seq = jnp.concatenate([seq, jnp.expand_dims(x, case.axis)], case.axis)
  np.testing.assert_array_equal(got, jnp.stack(want, case.axis))


# -- refusals ------------------------------------------------------------------
class TimeFlip(hk.Module):
  def __call__(self, x):
    return x[:, ::-1]


def _refused(forward, *fragments):
  ids = _ids(1, 0)
  model = hk.transform(forward)
  params = model.init(jax.random.key(0), ids)
  with pytest.raises(scanagram.ScanConversionError) as info:
    # without params= the pair converts at its first call
    to_step(model, ids, axis=1).init(params)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_time_flip_is_refused_naming_the_module():
  _refused(lambda ids: _head(TimeFlip()(_embed(ids))),
           "rev", "time_flip", "test_haiku.py")


def test_attention_without_causal_mask_is_refused():
  def forward(ids):
    x = _embed(ids)
    return hk.MultiHeadAttention(
        2, 4, w_init=hk.initializers.VarianceScaling())(x, x, x)
  message = _refused(forward, "multi_head_attention", "test_haiku.py")
  assert "haiku/_src" not in message  # the user's line, not Haiku's


def test_layer_norm_over_time_is_refused():
  """The operation is made in Haiku's source; the message gives the line of
  the user's model that called the module."""
  message = _refused(lambda ids: hk.LayerNorm(1, True, True)(_embed(ids)),
                     "layer_norm", "scanned axis 1", "test_haiku.py")
  assert "haiku/_src" not in message


class Noisy(hk.Module):
  def __call__(self, x):
    return hk.dropout(hk.next_rng_key(), 0.5, x)


def test_model_needing_an_rng_at_apply_time_is_refused():
  message = _refused(lambda ids: _head(Noisy()(_embed(ids))),
                     "'noisy'", "random key", "test_haiku.py")
  assert "dropout" in message


# -- the interface -------------------------------------------------------------
@pytest.fixture(scope="module")
def conv():
  return _case("conv1d_causal")


def test_attributes(conv):
  pair = conv.pair
  assert (pair.axis, pair.length, pair.has_state) == (1, L, False)
  assert pair.xs_spec == jax.ShapeDtypeStruct((B, L), jnp.int32)
  assert pair.element_spec == jax.ShapeDtypeStruct((B,), jnp.int32)
  spec = pair.carry_spec()
  carry = pair.init(conv.params)
  assert jax.tree.structure(spec) == jax.tree.structure(carry)
  assert all(s.shape == c.shape and s.dtype == c.dtype for s, c in
             zip(jax.tree.leaves(spec), jax.tree.leaves(carry)))
  assert _case("batch_norm").pair.has_state


def test_functional_step_leaves_the_carry_intact(conv):
  ids = _ids(1, 8)
  carry, _ = conv.pair.prefill(conv.params, ids[:, :3])
  _, y1 = conv.pair.step(conv.params, carry, ids[:, 3])
  assert not any(x.is_deleted() for x in jax.tree.leaves(carry))
  _, y2 = conv.pair.step(conv.params, carry, ids[:, 3])
  np.testing.assert_array_equal(y1, y2)


def test_stepper_donates_the_carry(conv):
  stepper = conv.pair.bind(conv.params)
  stepper.reset(_ids(1, 9)[:, :2])
  old = stepper.carry
  stepper(_ids(1, 9)[:, 2])
  assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert not any(x.is_deleted() for x in jax.tree.leaves(stepper.carry))


def test_stepper_refuses_to_step_past_L(conv):
  gpt = _case("gpt_block")      # attention: a buffer of L positions
  stepper = gpt.pair.bind(gpt.params)
  stepper.reset(_ids(1, 9))
  with pytest.raises(ValueError, match="full"):
    stepper(_ids(1, 9)[:, 0])
  # a causal convolution with biased layers keeps queues only: no L
  assert conv.pair.functions.max_length is None
  stepper = conv.pair.bind(conv.params)
  stepper.reset(_ids(1, 9))
  stepper(_ids(1, 9)[:, 0])


def test_generate_errors(conv):
  ids = _ids(1, 10)
  with pytest.raises(ValueError, match="at least 1 element"):
    conv.pair.generate(conv.params, ids[:, :0], 2, greedy)
  gpt = _case("gpt_block")
  with pytest.raises(ValueError, match="L=6"):
    gpt.pair.generate(gpt.params, ids[:, :3], L - 1, greedy)
  with pytest.raises(TypeError, match="sample"):
    conv.pair.generate(conv.params, ids[:, :3], 2,
                       lambda k, y: jnp.argmax(y, -1).astype(jnp.float32))
  assert conv.pair.generate(conv.params, ids[:, :3], L - 2,
                            greedy).shape == (B, L - 2)
  assert conv.pair.generate(conv.params, ids[:, :3], 0, greedy).shape == (B, 0)


def test_generate_samples_with_the_rng(conv):
  def sample(rng, logits):
    return jax.random.categorical(rng, logits).astype(jnp.int32)
  prompt = _ids(1, 11)[:, :1]
  a = conv.pair.generate(conv.params, prompt, L, sample, jax.random.key(1))
  b = conv.pair.generate(conv.params, prompt, L, sample, jax.random.key(1))
  c = conv.pair.generate(conv.params, prompt, L, sample, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert a.shape == (B, L) and not np.array_equal(a, c)


def test_wrong_arguments_are_refused(conv):
  ids = _ids(1, 12)
  with pytest.raises(TypeError, match="params"):
    conv.pair.init()
  with pytest.raises(TypeError, match="carry, x"):
    conv.pair.step(conv.params, ids[:, 0])
  with pytest.raises(ValueError, match="shape"):
    conv.pair.step(conv.params, conv.pair.init(conv.params), ids[:1, 0])
  with pytest.raises(ValueError, match="more than L"):
    conv.pair.prefill(conv.params, jnp.zeros((B, L + 1), jnp.int32))
  with pytest.raises(TypeError, match="state"):
    _case("batch_norm").pair.init(conv.params)


def test_without_apply_rng_and_shape_dtype_struct_examples():
  model = hk.without_apply_rng(hk.transform(
      lambda ids: _head(hk.Conv1D(D, 3, padding=hk.pad.causal)(_embed(ids)))))
  ids = _ids(1, 13)
  params = model.init(jax.random.key(0), ids)
  pair = to_step(model, jax.ShapeDtypeStruct((B, L), jnp.int32), axis=1)
  _, ys = _steps(pair, (params,), pair.init(params), ids, 0, 1)
  assert_trees_close(jnp.stack(ys, 1), model.apply(params, ids), tol=1e-4)


def test_pytree_inputs():
  def forward(xs):                                   # xs: {ids: [B, T], ...}
    x = _embed(xs["ids"]) * xs["scale"][..., None]
    return {"logits": _head(hk.Conv1D(D, 2, padding=hk.pad.causal)(x))}
  model = hk.transform(forward)
  xs = {"ids": _ids(1, 14), "scale": jax.random.uniform(jax.random.key(1),
                                                        (B, L))}
  params = model.init(jax.random.key(0), xs)
  pair = to_step(model, xs, axis=1)
  carry, out = pair.prefill(params, jax.tree.map(lambda x: x[:, :2], xs))
  _, y = pair.step(params, carry, jax.tree.map(lambda x: x[:, 2], xs))
  want = model.apply(params, None, xs)
  assert_trees_close(out, jax.tree.map(lambda w: w[:, :2], want), tol=1e-4)
  assert_trees_close(y, jax.tree.map(lambda w: w[:, 2], want), tol=1e-4)


def test_step_pair_of_a_plain_jax_function():
  def fun(w, xs):                                    # xs: [T, D]
    return jnp.cumsum(xs @ w, axis=0)
  w, xs = jnp.eye(3) * 2, jnp.ones((5, 3))
  for pair in (StepPair(fun, (w,), xs), to_step(fun, xs, params=w)):
    assert pair.num_unscanned == 1 and not pair.has_state
    stepper = pair.bind(w)
    assert isinstance(stepper, Stepper)
    ys = [stepper(x) for x in xs]
    assert_trees_close(jnp.stack(ys), fun(w, xs))


def test_torch_stepper_runs_a_haiku_pair(conv):
  torch = pytest.importorskip("torch")
  from adapters.torch import TorchStepper
  ids = _ids(1, 15)
  want = _apply(conv, ids)
  stepper = TorchStepper(conv.pair, conv.params)
  out = stepper.reset(torch.from_dlpack(ids[:, :3]))
  y = stepper(torch.from_dlpack(ids[:, 3]))
  np.testing.assert_allclose(out.numpy(), want[:, :3], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y.numpy(), want[:, 3], rtol=1e-4, atol=1e-4)


# -- rows: batch_axis and per-row lengths --------------------------------------
# Batch-major token models [B, T] -> [B, T, V] converted with batch_axis=0,
# axis=1 (and one time-major LSTM, batch_axis=1, axis=0). Row b of a ragged
# call must equal the model applied to row b's own sequence.
RB, RL = 3, 8


def _rows_transformer(ids):
  t = ids.shape[1]
  x = _embed(ids) + hk.get_parameter(
      "position", [RL, D], init=hk.initializers.RandomNormal())[jnp.arange(t)]
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
  h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(x)
  x = x + hk.MultiHeadAttention(
      num_heads=2, key_size=4, w_init=hk.initializers.VarianceScaling())(
          h, h, h, mask=mask)
  return _head(x + hk.nets.MLP([16, D])(x))


def _rows_lstm(ids, time_major=False):
  # The head has no bias: hk.Linear broadcasts its bias to the sequence's
  # shape, which the core counts as a length-L table (max_length L).
  return hk.Linear(V, with_bias=False)(
      _unroll(hk.LSTM(D), _embed(ids), time_major))


RowsCase = collections.namedtuple("RowsCase",
                                  "name model pair params axis rows apply")


@functools.lru_cache(maxsize=None)
def _rows_case(name):
  forward, axis, rows = {
      "transformer": (_rows_transformer, 1, 0),
      "lstm": (_rows_lstm, 1, 0),
      "lstm_time_major": (functools.partial(_rows_lstm, time_major=True),
                          0, 1),
  }[name]
  model = hk.without_apply_rng(hk.transform(forward))
  ids = _rows_ids(0, axis)
  params = model.init(jax.random.key(0), ids)
  pair = to_step(model, ids, axis=axis, batch_axis=rows)
  return RowsCase(name, model, pair, params, axis, rows,
                  jax.jit(model.apply))


def _rows_ids(seed, axis=1, length=RL):
  shape = (RB, length) if axis == 1 else (length, RB)
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def _row(case, x, b):
  """Row b of x (a block or outputs) as a batch of one, [1, T, ...] (or
  [T, 1, ...] time-major)."""
  return jax.lax.slice_in_dim(x, b, b + 1, axis=case.rows)


def _row_seq(case, x, b, n):
  """Row b's first n elements, as a batch of one."""
  return _slice(_row(case, x, b), 0, n, case.axis)


def _row_apply(case, seq):
  """The model on one row's sequence (a batch of one): its outputs for that
  row, [T, V]."""
  out = case.apply(case.params, seq)
  return jnp.take(out, 0, axis=case.rows)


def _check_row_block(case, ys, b, start, n, want):
  """Row b of a block's outputs: the model's outputs at positions start ..
  start + n - 1 of the row's own sequence, then exactly 0."""
  got = jnp.take(ys, b, axis=case.rows)           # [k, V]
  if n:
    np.testing.assert_allclose(got[:n], want[start:start + n], rtol=1e-4,
                               atol=1e-4, err_msg=f"row {b}")
  assert (got[n:] == 0).all(), f"row {b}: padded outputs are not 0"


@pytest.mark.parametrize("name", ["transformer", "lstm", "lstm_time_major"])
@pytest.mark.parametrize("p, lengths", [(RL, [0, RL, 3]), (5, [2, 0, 5])])
def test_ragged_prefill_equals_each_row_alone(name, p, lengths):
  case = _rows_case(name)
  ids = _slice(_rows_ids(20, case.axis), 0, p, case.axis)
  carry, out = case.pair.prefill(case.params, ids, lengths=lengths)
  assert case.pair.positions(carry).tolist() == lengths
  assert out.shape == ((RB, p, V) if case.axis == 1 else (p, RB, V))
  for b, n in enumerate(lengths):
    want = _row_apply(case, _row_seq(case, ids, b, n)) if n else None
    _check_row_block(case, out, b, 0, n, want)


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_extend_after_ragged_prefill_equals_each_row_alone(name):
  """Three turns of different lengths per row, then a step: each row's
  outputs are the model's on that row's concatenated turns."""
  case = _rows_case(name)
  pair, params = case.pair, case.params
  turns = [(_rows_ids(21, length=4), [2, 0, 4]),
           (_rows_ids(22, length=3), [3, 2, 0]),
           (_rows_ids(23, length=2), None)]          # every row takes both
  x = _rows_ids(24, length=1)[:, 0]
  seqs = [jnp.concatenate([t[b, :RL if n is None else n[b]]
                           for t, n in turns] + [x[b:b + 1]])
          for b in range(RB)]
  wants = [_row_apply(case, s[None]) for s in seqs]

  carry, ys = pair.prefill(params, turns[0][0], lengths=turns[0][1])
  starts = np.zeros(RB, int)
  for i, (block, lengths) in enumerate(turns):
    if i:
      carry, ys = pair.extend(params, carry, block, lengths=lengths)
    ns = [block.shape[1]] * RB if lengths is None else lengths
    for b in range(RB):
      _check_row_block(case, ys, b, starts[b], ns[b], wants[b])
    starts += ns
    assert pair.positions(carry).tolist() == starts.tolist()
  carry, y = pair.step(params, carry, x)
  for b in range(RB):
    np.testing.assert_allclose(y[b], wants[b][starts[b]], rtol=1e-4,
                               atol=1e-4)
  assert pair.positions(carry).tolist() == (starts + 1).tolist()


def _greedy_alone(case, seq, steps):
  """Greedy generation for one row by re-running the model on the growing
  sequence (seq: [1, n])."""
  out = []
  for _ in range(steps):
    x = greedy(None, case.apply(case.params, seq)[:, -1])
    out.append(int(x[0]))
    seq = jnp.concatenate([seq, x[:, None]], axis=1)
  return out


@pytest.mark.parametrize("name", ["transformer", "lstm"])
def test_generate_with_lengths_equals_each_row_alone(name):
  case = _rows_case(name)
  lengths, steps = [1, 5, 3], 4                 # max(lengths) + steps - 1 = RL
  prompt = _rows_ids(25, length=5)
  got = case.pair.generate(case.params, prompt, steps, greedy,
                           jax.random.key(0), lengths=lengths)
  assert got.shape == (RB, steps)
  for b, n in enumerate(lengths):
    assert got[b].tolist() == _greedy_alone(
        case, prompt[b:b + 1, :n], steps), f"row {b}"
  alone = case.pair.generate(case.params, prompt[2:, :3], steps, greedy)
  assert alone[0].tolist() == got[2].tolist()    # the pair, on one row


def test_stepper_reset_with_lengths_extend_and_steps():
  case = _rows_case("transformer")
  stepper = case.pair.bind(case.params)
  assert stepper.positions.tolist() == [0] * RB
  prompt, block = _rows_ids(26, length=5), _rows_ids(27, length=2)
  xs = _rows_ids(28, length=2)
  lengths, more = [3, 0, 5], [2, 1, 0]
  seqs = [jnp.concatenate([prompt[b, :lengths[b]], block[b, :more[b]],
                           xs[b]]) for b in range(RB)]
  wants = [_row_apply(case, s[None]) for s in seqs]

  out = stepper.reset(prompt, lengths=lengths)
  assert stepper.positions.tolist() == lengths and stepper.position == 5
  for b in range(RB):
    _check_row_block(case, out, b, 0, lengths[b], wants[b])
  old = stepper.carry
  ys = stepper.extend(block, lengths=more)
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # donated
  for b in range(RB):
    _check_row_block(case, ys, b, lengths[b], more[b], wants[b])
  starts = np.add(lengths, more)
  assert stepper.positions.tolist() == starts.tolist()
  for t in range(2):
    y = stepper(xs[:, t])
    for b in range(RB):
      np.testing.assert_allclose(y[b], wants[b][starts[b] + t], rtol=1e-4,
                                 atol=1e-4)
  assert stepper.positions.tolist() == (starts + 2).tolist()
  assert stepper.position == 7
  with pytest.raises(ValueError, match=f"position 8 .*L={RL}"):
    stepper.extend(block)                   # row 2 would reach position 8
  assert stepper.reset() is None and stepper.positions.tolist() == [0] * RB


def test_lengths_without_batch_axis_is_a_type_error(conv):
  pair, params, ids = conv.pair, conv.params, _ids(1, 29)
  carry = pair.init(params)
  stepper = pair.bind(params)
  calls = [lambda: pair.prefill(params, ids[:, :3], lengths=[1, 3]),
           lambda: pair.extend(params, carry, ids[:, :3], lengths=[1, 3]),
           lambda: pair.generate(params, ids[:, :3], 2, greedy,
                                 lengths=[1, 3]),
           lambda: stepper.reset(ids[:, :3], lengths=[1, 3]),
           lambda: stepper.extend(ids[:, :3], lengths=[1, 3])]
  calls.append(lambda: pair.init(params, batch_size=4))
  for call in calls:
    with pytest.raises(TypeError, match="batch_axis"):
      call()
  assert stepper.position == 0


def test_bad_lengths_are_refused():
  case = _rows_case("lstm")
  pair, params, ids = case.pair, case.params, _rows_ids(30)
  with pytest.raises(ValueError, match=r"\[3\] integers"):
    pair.prefill(params, ids, lengths=[1, 2])
  with pytest.raises(ValueError, match=r"\[3\] integers"):
    pair.prefill(params, ids, lengths=[1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
    pair.prefill(params, ids[:, :4], lengths=[1, 5, 0])
  with pytest.raises(ValueError, match=r"lie in \[1, 4\]"):
    pair.generate(params, ids[:, :4], 2, greedy, lengths=[1, 0, 2])
  with pytest.raises(ValueError, match="at least one element"):
    pair.extend(params, pair.init(params), ids[:, :0], lengths=[0, 0, 0])
  with pytest.raises(TypeError, match="needs a prompt"):
    pair.bind(params).reset(lengths=[1, 1, 1])
  assert pair.positions(pair.init(params)).tolist() == [0] * RB
  assert pair.positions(pair.init(params, batch_size=5)).shape == (5,)


def test_lstm_generates_and_steps_past_L():
  """The LSTM's state does not depend on L: generation and steps go on past
  L and equal the training mode run at that longer length."""
  case = _rows_case("lstm")
  pair = case.pair
  assert pair.max_length is None and pair.length == RL
  p, steps = 3, RL                                  # P + steps - 1 = RL + 2
  prompt = _rows_ids(31, length=p)
  got = pair.generate(case.params, prompt, steps, greedy)
  for b in range(RB):
    assert got[b].tolist() == _greedy_alone(case, prompt[b:b + 1], steps)
  lengths = [1, 3, 2]
  got = pair.generate(case.params, prompt, steps, greedy, lengths=lengths)
  for b, n in enumerate(lengths):
    assert got[b].tolist() == _greedy_alone(case, prompt[b:b + 1, :n], steps)
  # the stepper and extend go on past L too
  ids = _rows_ids(32, length=RL + 4)
  want = case.apply(case.params, ids)
  stepper = pair.bind(case.params)
  np.testing.assert_allclose(stepper.reset(ids[:, :RL]), want[:, :RL],
                             rtol=1e-4, atol=1e-4)
  ys = [stepper(ids[:, t]) for t in range(RL, RL + 2)]
  ys.append(stepper.extend(ids[:, RL + 2:]))
  np.testing.assert_allclose(jnp.concatenate([jnp.stack(ys[:2], 1), ys[2]],
                                             1), want[:, RL:], rtol=1e-4,
                             atol=1e-4)
  assert stepper.position == RL + 4


def test_attention_refuses_to_go_past_L():
  case = _rows_case("transformer")
  pair, params = case.pair, case.params
  assert pair.max_length == RL
  prompt = _rows_ids(33, length=3)
  assert pair.generate(params, prompt, RL - 2,       # 3 + 6 - 1 = L: fits
                       greedy).shape == (RB, RL - 2)
  with pytest.raises(ValueError, match=f"L={RL}"):
    pair.generate(params, prompt, RL - 1, greedy)
  with pytest.raises(ValueError, match=f"L={RL}"):
    pair.generate(params, prompt, RL - 1, greedy, lengths=[1, 3, 2])
  assert pair.generate(params, prompt, RL - 1, greedy,
                       lengths=[1, 2, 2]).shape == (RB, RL - 1)
  carry, _ = pair.prefill(params, _rows_ids(34, length=6), lengths=[6, 2, 4])
  with pytest.raises(ValueError, match=f"position 8 \\(row 0\\).*L={RL}"):
    pair.extend(params, carry, _rows_ids(35, length=3))
  carry, _ = pair.extend(params, carry, _rows_ids(35, length=3),
                         lengths=[2, 3, 0])
  assert pair.positions(carry).tolist() == [8, 5, 4]
  with pytest.raises(ValueError, match=f"step: .*position 8 \\(row 0\\)"):
    pair.step(params, carry, _rows_ids(37)[:, 0])
  nan_step = jax.jit(pair.step)(params, carry, _rows_ids(37)[:, 0])[1]
  assert np.isnan(np.asarray(nan_step[0])).all()     # row 0 is at L
  assert not np.isnan(np.asarray(nan_step[1:])).any()
  stepper = pair.bind(params)
  stepper.reset(_rows_ids(36))
  with pytest.raises(ValueError, match="full"):
    stepper(_rows_ids(36)[:, 0])
