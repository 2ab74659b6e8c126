"""scanagram.adapters.equinox: Equinox models as prefill / step / generate.

Every model is a small token model on one sequence, ``ids [T] -> logits [T,
V]``, as Equinox models usually are (the batch is the user's ``jax.vmap``);
``batched=True`` serves rows ``[B, T]``.
"""
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import assert_trees_close
from scanagram import sampling
from scanagram.adapters import equinox as eqx_adapter

B, L, D, V = 2, 8, 8, 7
TOL = 1e-4


class Transformer(eqx.Module):
  """Embedding, learned positions, causal ``eqx.nn.MultiheadAttention``,
  LayerNorm, RMSNorm, an MLP and dropout (off in inference mode)."""
  embed: eqx.nn.Embedding
  position: jax.Array
  norm: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  drop: eqx.nn.Dropout
  mlp: eqx.nn.Sequential
  head: eqx.nn.Linear
  causal: bool = eqx.field(static=True)

  def __init__(self, key, causal=True):
    k = jax.random.split(key, 6)
    self.embed = eqx.nn.Embedding(V, D, key=k[0])
    self.position = jax.random.normal(k[1], (L, D))
    self.norm = eqx.nn.LayerNorm(D)
    self.attn = eqx.nn.MultiheadAttention(2, D, dropout_p=0.1, key=k[2])
    self.drop = eqx.nn.Dropout(0.1)
    self.mlp = eqx.nn.Sequential([
        eqx.nn.RMSNorm(D), eqx.nn.Linear(D, 16, key=k[3]),
        eqx.nn.Lambda(jax.nn.gelu), eqx.nn.Linear(16, D, key=k[4])])
    self.head = eqx.nn.Linear(D, V, key=k[5])
    self.causal = causal

  def __call__(self, ids):                          # ids: [T]
    t = ids.shape[0]
    x = jax.vmap(self.embed)(ids) + self.position[:t]
    h = jax.vmap(self.norm)(x)
    mask = jnp.tril(jnp.ones((t, t), bool)) if self.causal else None
    x = x + self.drop(self.attn(h, h, h, mask=mask))
    x = x + jax.vmap(self.mlp)(x)
    return jax.vmap(self.head)(x)


class GRU(eqx.Module):
  """``eqx.nn.GRUCell`` in ``lax.scan``."""
  embed: eqx.nn.Embedding
  cell: eqx.nn.GRUCell
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(V, D, key=k[0])
    self.cell = eqx.nn.GRUCell(D, D, key=k[1])
    self.head = eqx.nn.Linear(D, V, key=k[2])

  def __call__(self, ids):                          # ids: [T]
    def step(h, x):
      h = self.cell(x, h)
      return h, h
    _, hs = lax.scan(step, jnp.zeros(D), jax.vmap(self.embed)(ids))
    return jax.vmap(self.head)(hs)


def _model(name, seed=0):
  if name == "transformer":
    return eqx.nn.inference_mode(Transformer(jax.random.key(seed)))
  return GRU(jax.random.key(seed))


def _ids(seed, shape=(L,)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V, jnp.int32)


@functools.lru_cache(maxsize=None)
def _pair(name, batched=False):
  example = _ids(0, (B, L) if batched else (L,))
  return eqx_adapter.to_step(_model(name), example, batched=batched)


@functools.lru_cache(maxsize=None)
def _apply(name, seed=0):
  """The model on one whole sequence, jitted."""
  model = _model(name, seed)
  return jax.jit(lambda ids: model(ids))


def _params(model):
  return eqx.filter(model, eqx.is_array)


# -- equality with the model ---------------------------------------------------
@pytest.mark.parametrize("name", ["transformer", "gru"])
def test_prefill_extend_and_steps_equal_the_model(name):
  pair, params = _pair(name), _params(_model(name))
  assert (pair.axis, pair.batch_axis) == (0, None)
  ids = _ids(1)
  want = _apply(name)(ids)
  for p in (0, 3, L):
    carry, out = pair.prefill(params, ids[:p])
    assert_trees_close(out, want[:p], tol=TOL)
    assert int(pair.positions(carry)) == p
    if p == 3:
      _, ys = pair.extend(params, carry, ids[3:5])
      assert_trees_close(ys, want[3:5], tol=TOL)
    for t in range(p, L):
      carry, y = pair.step(params, carry, ids[t])
      assert_trees_close(y, want[t], tol=TOL)


@pytest.mark.parametrize("name", ["transformer", "gru"])
def test_batched_rows_equal_each_row_alone(name):
  """``batched=True``: the model vmapped over rows [B, T], each row at its own
  position (batch_axis=0, axis=1)."""
  pair, params = _pair(name, True), _params(_model(name))
  assert (pair.axis, pair.batch_axis) == (1, 0)
  ids = _ids(2, (B, L))
  lengths = [5, 2]
  carry, out = pair.prefill(params, ids[:, :5], lengths=lengths)
  carry, y = pair.step(params, carry, ids[:, 5])
  assert pair.positions(carry).tolist() == [6, 3]
  for b, n in enumerate(lengths):
    row = jnp.concatenate([ids[b, :n], ids[b, 5:6]])
    want = _apply(name)(row)
    assert_trees_close(out[b, :n], want[:n], tol=TOL)
    assert (out[b, n:] == 0).all()
    assert_trees_close(y[b], want[n], tol=TOL)


def test_new_parameters_reuse_the_compiled_functions():
  pair = _pair("transformer")
  ids = _ids(3)
  params = _params(_model("transformer"))
  carry, _ = pair.prefill(params, ids[:3])
  pair.step(params, carry, ids[3])
  counts = dict(pair.trace_counts)
  other = _params(_model("transformer", 1))
  carry, out = pair.prefill(other, ids[:3])
  _, y = pair.step(other, carry, ids[3])
  want = _apply("transformer", 1)(ids)
  assert_trees_close(out, want[:3], tol=TOL)
  assert_trees_close(y, want[3], tol=TOL)
  assert dict(pair.trace_counts) == counts
  assert pair.max_length == L


# -- generation ----------------------------------------------------------------
def _greedy_alone(name, seq, steps):
  """Greedy generation by re-running the model on the growing sequence."""
  seq = list(seq.tolist())
  for _ in range(steps):
    logits = _apply(name)(jnp.array(seq, jnp.int32))
    seq.append(int(sampling.greedy(None, logits[-1])))
  return seq[-steps:]


def test_gru_greedy_generate_equals_a_python_loop_past_l():
  """One sequence; the GRU's carry does not depend on L: it goes on past
  it."""
  pair, params = _pair("gru"), _params(_model("gru"))
  assert pair.max_length is None
  prompt, steps = _ids(4, (3,)), L
  got = pair.generate(params, prompt, steps, sampling.greedy)
  assert got.tolist() == _greedy_alone("gru", prompt, steps)


def test_batched_generation_sampling_stop_tokens_stream_and_beam():
  pair, params = _pair("transformer", True), _params(_model("transformer"))
  prompt, lengths, steps = _ids(5, (B, 5)), [5, 2], 4
  greedy = pair.generate(params, prompt, steps, sampling.greedy,
                         lengths=lengths)
  for b, n in enumerate(lengths):
    assert greedy[b].tolist() == _greedy_alone("transformer", prompt[b, :n],
                                               steps), f"row {b}"

  for sampler in (sampling.top_k(3), sampling.top_p(0.9)):
    a = pair.generate(params, prompt, steps, sampler, 1, lengths=lengths)
    assert a.shape == (B, steps) and a.dtype == jnp.int32
    assert ((a >= 0) & (a < V)).all()

  stop = int(greedy[0, 1])
  stopped = pair.generate(params, prompt, steps, sampling.greedy,
                          lengths=lengths, stop_tokens=[stop], pad=-1)
  for b in range(B):
    row = greedy[b].tolist()
    end = row.index(stop) + 1 if stop in row else steps
    assert stopped[b].tolist() == row[:end] + [-1] * (steps - end)

  chunks = list(pair.stream(params, prompt, steps, sampling.top_k(3), 2,
                            lengths=lengths, chunk=3))
  np.testing.assert_array_equal(
      jnp.concatenate(chunks, axis=1),
      pair.generate(params, prompt, steps, sampling.top_k(3), 2,
                    lengths=lengths))

  tokens, _ = pair.beam_search(params, prompt, steps, 1, lengths=lengths)
  np.testing.assert_array_equal(tokens[:, 0], greedy)


# -- bind and the Stepper ------------------------------------------------------
def test_bind_partitions_the_model_snapshot_and_restore():
  pair, model = _pair("transformer"), _model("transformer")
  ids = _ids(6)
  want = _apply("transformer")(ids)
  stepper = pair.bind(model)
  assert_trees_close(stepper.reset(ids[:3]), want[:3], tol=TOL)
  saved = stepper.snapshot()
  assert_trees_close(jnp.stack([stepper(ids[3]), stepper(ids[4])]),
                     want[3:5], tol=TOL)
  stepper.restore(saved)
  assert_trees_close(stepper(ids[3]), want[3], tol=TOL)
  for other in (Transformer(jax.random.key(0)),       # inference=False
                eqx.nn.inference_mode(Transformer(jax.random.key(0),
                                                  causal=False))):
    with pytest.raises(TypeError, match="non-array fields"):
      pair.bind(other)


# -- refusals ------------------------------------------------------------------
def _refused(model, *fragments, error=scanagram.ScanConversionError,
             params=None):
  pair = eqx_adapter.to_step(model, _ids(0))
  with pytest.raises(error) as info:
    pair.prefill(_params(model) if params is None else params, _ids(0)[:2])
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, message


def test_non_causal_model_is_refused_naming_the_source_line():
  _refused(eqx.nn.inference_mode(Transformer(jax.random.key(0), False)),
           "test_equinox_adapter.py")


def test_dropout_outside_inference_mode_is_refused():
  _refused(Transformer(jax.random.key(0)), "random key",
           "eqx.nn.inference_mode", "test_equinox_adapter.py")


def test_other_arguments_are_refused():
  gru = _model("gru")
  bigger = eqx.tree_at(lambda m: m.head, gru,
                       eqx.nn.Linear(D, V + 1, key=jax.random.key(1)))
  _refused(gru, "params.head.weight is float32[8, 8], the model's "
           "float32[7, 8]", "eqx.filter(model, eqx.is_array)",
           error=TypeError, params=_params(bigger))
  with pytest.raises(TypeError, match="eqx.Module"):
    eqx_adapter.to_step(lambda ids: ids, _ids(0))
