"""scanagram.adapters.flax (linen) and scanagram.adapters.nnx.

Every model is a small token model ``ids [B, T] -> logits [B, T, V]``
(batch-major: axis 1), so that greedy generation can feed outputs back as
inputs and be checked against re-running the model on the growing sequence.
"""
import collections
import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import scanagram
from conftest import assert_trees_close
from scanagram import sampling
from scanagram.adapters import flax as flax_adapter
from scanagram.adapters import nnx as nnx_adapter

B, L, D, V = 2, 8, 8, 7
TOL = 1e-4
TRACES = collections.Counter()


# -- the models ----------------------------------------------------------------
class LinenTransformer(nn.Module):
  """Embedding, learned positions, causal attention, an MLP; dropout off with
  ``deterministic=True``."""
  causal: bool = True

  @nn.compact
  def __call__(self, ids, deterministic: bool = False):
    TRACES["linen_transformer"] += 1
    t = ids.shape[1]
    position = self.param("position", nn.initializers.normal(1.0), (L, D))
    x = nn.Embed(V, D)(ids) + position[:t]
    h = nn.LayerNorm()(x)
    mask = nn.make_causal_mask(ids) if self.causal else None
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.1)(
        h, h, mask=mask, deterministic=deterministic)
    x = nn.Dropout(0.1, deterministic=deterministic)(x)
    x = x + nn.Dense(D)(nn.gelu(nn.Dense(16)(nn.RMSNorm()(x))))
    return nn.Dense(V)(x)


class LinenLSTM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    TRACES["linen_lstm"] += 1
    return nn.Dense(V)(nn.RNN(nn.LSTMCell(D))(nn.Embed(V, D)(ids)))


class LinenBatchNorm(nn.Module):
  """BatchNorm: batch statistics with ``train=True``, the running averages
  (read) with ``train=False``."""

  @nn.compact
  def __call__(self, ids, train: bool = True):
    TRACES["linen_batch_norm"] += 1
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(
        nn.Embed(V, D)(ids))
    return nn.Dense(V)(nn.relu(x))


class NNXTransformer(nnx.Module):
  """Embedding, learned positions, ``nnx.MultiHeadAttention`` under a causal
  mask, an MLP, BatchNorm and Dropout (both of which keep random streams or
  statistics): converted after ``model.eval()``."""

  def __init__(self, rngs, causal=True):
    self.causal = causal
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.position = nnx.Param(jax.random.normal(rngs.params(), (L, D)))
    self.norm = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, D, dropout_rate=0.1, decode=False,
                                       rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.RMSNorm(D, rngs=rngs),
                              nnx.Linear(D, 16, rngs=rngs), nnx.gelu,
                              nnx.Linear(16, D, rngs=rngs))
    self.bn = nnx.BatchNorm(D, rngs=rngs)
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, ids):
    TRACES["nnx_transformer"] += 1
    t = ids.shape[1]
    x = self.embed(ids) + self.position[:t]
    h = self.norm(x)
    mask = nnx.make_causal_mask(ids) if self.causal else None
    x = x + self.drop(self.attn(h, mask=mask))
    x = x + self.mlp(x)
    return self.head(self.bn(x))


def _ids(seed, shape=(B, L)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


def _positive_stats(tree, seed):
  """Running averages with a positive variance, not the defaults."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.5 + jnp.abs(jax.random.normal(k, x.shape, x.dtype))
      for k, x in zip(keys, leaves)])


def _nnx_model(seed, causal=True):
  model = NNXTransformer(nnx.Rngs(seed), causal)
  model.bn.mean[...] = jax.random.normal(jax.random.key(seed + 10), (D,))
  model.bn.var[...] = _positive_stats(model.bn.var[...], seed + 20)
  model.eval()
  return model


# Case: ``pair`` (and ``apply(u, ids)``, the model on whole sequences) take
# the unscanned ``u``; ``u2`` is another value of the same shapes.
Case = collections.namedtuple("Case", "name pair apply u u2")


def _linen_case(name, module, batch_axis, **kwargs):
  ids = _ids(0)
  init = jax.jit(module.init)            # __call__'s defaults: training mode
  u, u2 = (init(jax.random.key(s), ids) for s in (0, 1))
  if "batch_stats" in u:
    u = {**u, "batch_stats": _positive_stats(u["batch_stats"], 2)}
  pair = flax_adapter.to_step(module, ids, axis=1, batch_axis=batch_axis,
                              **kwargs)
  return Case(name, pair, functools.partial(module.apply, **kwargs), u, u2)


def _nnx_case(batch_axis):
  model, model2 = _nnx_model(0), _nnx_model(1)
  graphdef = nnx.graphdef(model)
  pair = nnx_adapter.to_step(model, _ids(0), axis=1, batch_axis=batch_axis)
  return Case("nnx_transformer", pair,
              lambda u, ids: nnx.merge(graphdef, u, nnx.state(
                  model, nnx.RngState), copy=True)(ids),
              nnx_adapter.state(model), nnx_adapter.state(model2))


@functools.lru_cache(maxsize=None)
def _case(name, batch_axis=None):
  if name == "linen_transformer":
    return _linen_case(name, LinenTransformer(), batch_axis,
                       deterministic=True)
  if name == "linen_lstm":
    return _linen_case(name, LinenLSTM(), batch_axis)
  if name == "linen_batch_norm":
    return _linen_case(name, LinenBatchNorm(), batch_axis, train=False)
  return _nnx_case(batch_axis)


NAMES = ["linen_transformer", "linen_lstm", "linen_batch_norm",
         "nnx_transformer"]


# -- equality with the model ---------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_prefill_extend_and_steps_equal_the_model(name):
  case = _case(name)
  pair, u = case.pair, case.u
  ids = _ids(3)
  want = case.apply(u, ids)
  for p in (0, 3, L):
    carry, out = pair.prefill(u, ids[:, :p])
    assert_trees_close(out, want[:, :p], tol=TOL)
    assert pair.positions(carry).tolist() == p
    if p == 3:
      _, ys = pair.extend(u, carry, ids[:, 3:5])
      assert_trees_close(ys, want[:, 3:5], tol=TOL)
    for t in range(p, L):
      carry, y = pair.step(u, carry, ids[:, t])
      assert_trees_close(y, want[:, t], tol=TOL)


@pytest.mark.parametrize("name", NAMES)
def test_new_parameters_reuse_the_compiled_functions(name):
  case = _case(name)
  pair = case.pair
  ids = _ids(4)
  carry, _ = pair.prefill(case.u, ids[:, :3])
  pair.step(case.u, carry, ids[:, 3])
  counts = dict(pair.trace_counts)
  carry, out = pair.prefill(case.u2, ids[:, :3])
  _, y = pair.step(case.u2, carry, ids[:, 3])
  want = case.apply(case.u2, ids[:, :4])
  assert_trees_close(out, want[:, :3], tol=TOL)
  assert_trees_close(y, want[:, 3], tol=TOL)
  assert dict(pair.trace_counts) == counts


def test_linen_batch_norm_converts_without_init():
  """The pair converts from the variables it is given: BatchNorm's running
  averages are read, and ``module.init`` is never run for the conversion."""
  module = LinenBatchNorm()
  ids = _ids(5)
  variables = _case("linen_batch_norm").u
  pair = flax_adapter.to_step(module, ids, axis=1, train=False)
  before = TRACES["linen_batch_norm"]
  with mock.patch.object(LinenBatchNorm, "init",
                         side_effect=AssertionError("init was run")):
    carry, out = pair.prefill(variables, ids[:, :4])
    _, y = pair.step(variables, carry, ids[:, 4])
  assert TRACES["linen_batch_norm"] > before
  want = module.apply(variables, ids, train=False)
  assert_trees_close(out, want[:, :4], tol=TOL)
  assert_trees_close(y, want[:, 4], tol=TOL)
  # the batch statistics of the block would give other outputs
  assert not np.allclose(module.apply(variables, ids[:, :4], train=True,
                                      mutable=["batch_stats"])[0], out,
                         atol=1e-2)


def test_functions_read_before_the_first_call():
  """``max_length`` before any call: linen runs ``module.init`` abstractly,
  NNX takes the shapes from the model."""
  linen = flax_adapter.to_step(LinenLSTM(), _ids(0), axis=1)
  assert linen.max_length is None                  # an LSTM needs no L
  model = _nnx_model(0)
  nnx_pair = nnx_adapter.to_step(model, _ids(0), axis=1)
  assert nnx_pair.max_length == L
  carry = nnx_pair.init(nnx_adapter.state(model))
  assert jax.tree.map(lambda c: c.shape, carry) == jax.tree.map(
      lambda c: c.shape, nnx_pair.carry_spec())


def test_default_axis_warns_on_a_batch_major_example():
  for convert in (lambda: flax_adapter.to_step(LinenLSTM(), _ids(0)),
                  lambda: nnx_adapter.to_step(_nnx_model(0), _ids(0))):
    with pytest.warns(UserWarning, match="axis=1") as record:
      assert convert().axis == 0
    assert record[0].filename == __file__


# -- generation (rows: batch_axis=0) -------------------------------------------
GENERATED = ["linen_transformer", "nnx_transformer"]
LENGTHS = [5, 2]
STEPS = 4                                     # max(LENGTHS) + STEPS - 1 = L


@functools.lru_cache(maxsize=None)
def _jitted_apply(name):
  return jax.jit(_case(name).apply)


def _greedy_alone(case, seq, steps):
  """Greedy generation for one row by re-running the model on the growing
  sequence (seq: [n]). The sequence is right-padded to L: the model is causal,
  and one compiled model serves every length."""
  apply, seq = _jitted_apply(case.name), list(seq.tolist())
  for _ in range(steps):
    padded = jnp.array([seq + [0] * (L - len(seq))], jnp.int32)
    seq.append(int(sampling.greedy(None, apply(case.u, padded)[0,
                                                            len(seq) - 1])))
  return seq[-steps:]


@pytest.mark.parametrize("name", GENERATED)
def test_greedy_generate_with_lengths_equals_each_row_alone(name):
  case = _case(name, 0)
  prompt = _ids(6, (B, 5))
  got = case.pair.generate(case.u, prompt, STEPS, sampling.greedy,
                           lengths=LENGTHS)
  assert got.shape == (B, STEPS)
  for b, n in enumerate(LENGTHS):
    assert got[b].tolist() == _greedy_alone(case, prompt[b, :n],
                                            STEPS), f"row {b}"


@pytest.mark.parametrize("name", GENERATED)
def test_sampled_generation_stop_tokens_stream_and_beam(name):
  case = _case(name, 0)
  pair, u = case.pair, case.u
  prompt = _ids(7, (B, 5))
  for sampler in (sampling.top_k(3), sampling.top_p(0.9)):
    a = pair.generate(u, prompt, STEPS, sampler, 1, lengths=LENGTHS)
    assert a.shape == (B, STEPS) and a.dtype == jnp.int32
    assert ((a >= 0) & (a < V)).all()
    np.testing.assert_array_equal(
        a, pair.generate(u, prompt, STEPS, sampler, 1, lengths=LENGTHS))

  greedy = pair.generate(u, prompt, STEPS, sampling.greedy, lengths=LENGTHS)
  stop = int(greedy[0, 1])
  stopped = pair.generate(u, prompt, STEPS, sampling.greedy, lengths=LENGTHS,
                          stop_tokens=[stop], pad=-1)
  for b in range(B):
    row = greedy[b].tolist()
    end = row.index(stop) + 1 if stop in row else STEPS
    assert stopped[b].tolist() == row[:end] + [-1] * (STEPS - end)

  chunks = list(pair.stream(u, prompt, STEPS, sampling.top_k(3), 2,
                            lengths=LENGTHS, chunk=3))
  assert [c.shape[1] for c in chunks] == [3, 1]
  np.testing.assert_array_equal(
      jnp.concatenate(chunks, axis=1),
      pair.generate(u, prompt, STEPS, sampling.top_k(3), 2,
                    lengths=LENGTHS))

  tokens, scores = pair.beam_search(u, prompt, STEPS, 1, lengths=LENGTHS)
  assert tokens.shape == (B, 1, STEPS) and scores.shape == (B, 1)
  np.testing.assert_array_equal(tokens[:, 0], greedy)


def test_lstm_rows_ragged_prefill_and_steps_past_l():
  """nn.RNN's carry does not depend on L: rows step on past it."""
  case = _case("linen_lstm", 0)
  pair, u = case.pair, case.u
  ids = _ids(8, (B, L + 2))
  want = case.apply(u, ids)
  carry, out = pair.prefill(u, ids[:, :5], lengths=[5, 3])
  assert_trees_close(out[0], want[0, :5], tol=TOL)
  assert_trees_close(out[1, :3], want[1, :3], tol=TOL)
  # row 1 catches up with row 0, then both go past L
  carry, ys = pair.extend(u, carry, ids[:, 3:5], lengths=[0, 2])
  assert_trees_close(ys[1], want[1, 3:5], tol=TOL)
  for t in range(5, L + 2):
    carry, y = pair.step(u, carry, ids[:, t])
    assert_trees_close(y, want[:, t], tol=TOL)


# -- NNX: bind and the Stepper -------------------------------------------------
def test_nnx_bind_snapshot_and_restore():
  case = _case("nnx_transformer", 0)
  model = _nnx_model(0)
  ids = _ids(9)
  want = case.apply(case.u, ids)
  stepper = case.pair.bind(model)
  assert_trees_close(stepper.reset(ids[:, :3]), want[:, :3], tol=TOL)
  saved = stepper.snapshot()
  first = [stepper(ids[:, t]) for t in (3, 4)]
  assert_trees_close(jnp.stack(first, 1), want[:, 3:5], tol=TOL)
  stepper.restore(saved)
  assert stepper.position == 3
  assert_trees_close(stepper(ids[:, 3]), want[:, 3], tol=TOL)
  # bind also takes the state itself, as the functional form does
  other = case.pair.bind(case.u2)
  other.reset(ids[:, :3])
  assert_trees_close(other(ids[:, 3]), case.apply(case.u2, ids)[:, 3],
                     tol=TOL)


def test_nnx_bind_refuses_a_model_of_another_graph():
  pair = _case("nnx_transformer", 0).pair
  training = _nnx_model(0)
  training.train()                        # deterministic=False: another graph
  with pytest.raises(TypeError, match="graph"):
    pair.bind(training)
  with pytest.raises(TypeError, match="graph"):
    pair.bind(_nnx_model(0, causal=False))


# -- refusals ------------------------------------------------------------------
def _refused(pair, unscanned, *fragments, error=scanagram.ScanConversionError):
  with pytest.raises(error) as info:
    pair.prefill(unscanned, _ids(0)[:, :2])
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_non_causal_models_are_refused_naming_the_source_line():
  module = LinenTransformer(causal=False)
  variables = _case("linen_transformer").u
  _refused(flax_adapter.to_step(module, _ids(0), axis=1, deterministic=True),
           variables, "test_flax_adapters.py")
  model = _nnx_model(0, causal=False)
  _refused(nnx_adapter.to_step(model, _ids(0), axis=1),
           nnx_adapter.state(model), "test_flax_adapters.py")


def test_linen_rng_and_mutable_collections_are_refused():
  variables = _case("linen_transformer").u
  _refused(flax_adapter.to_step(LinenTransformer(), _ids(0), axis=1),
           variables, "random key", "deterministic=True",
           "test_flax_adapters.py")
  bn = _case("linen_batch_norm").u
  _refused(flax_adapter.to_step(LinenBatchNorm(), _ids(0), axis=1),
           bn, "batch_stats", "train=False", "test_flax_adapters.py")
  # variables without the batch statistics
  _refused(flax_adapter.to_step(LinenBatchNorm(), _ids(0), axis=1,
                                train=False),
           {"params": bn["params"]}, "batch_stats", "module.init",
           error=TypeError)
  for kwargs in ({"rngs": {"dropout": jax.random.key(0)}},
                 {"mutable": ["batch_stats"]}):
    with pytest.raises(TypeError, match=list(kwargs)[0]):
      flax_adapter.to_step(LinenBatchNorm(), _ids(0), axis=1, **kwargs)
  with pytest.raises(TypeError, match="adapters.nnx"):
    flax_adapter.to_step(_nnx_model(0), _ids(0), axis=1)


def test_nnx_training_mode_is_refused():
  model = _nnx_model(0)
  model.train()
  _refused(nnx_adapter.to_step(model, _ids(0), axis=1),
           nnx_adapter.state(model), "model.eval()", "'bn/mean' (BatchNorm)",
           "'drop/rngs/count' (Dropout)")
  with pytest.raises(TypeError, match="adapters.flax"):
    nnx_adapter.to_step(LinenLSTM(), _ids(0), axis=1)
