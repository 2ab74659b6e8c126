"""scanagram.stepping: StepPair and Stepper, the framework-free serving layer.

The models are tiny causal token models ``ids [B, T] -> logits [B, T, V]``
written in plain JAX (an embedding, a cumulative sum or causal attention, a
head), so that generation can be checked against re-running the model on the
growing sequence.
"""
import functools
import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scanagram
from adapters.haiku import StepPair as HaikuStepPair
from adapters.haiku import to_step
from scanagram import StepPair, Stepper, sampling

B, L, D, V = 3, 10, 8, 7
PAD = -1


def make_params(seed=0, vocab=V):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"embed": jax.random.normal(k[0], (vocab, D)),
          "wq": jax.random.normal(k[1], (D, D)) / 3,
          "wk": jax.random.normal(k[2], (D, D)) / 3,
          "out": 2 * jax.random.normal(k[3], (D, vocab))}


def cumulative(params, ids):
  """A running sum of embeddings: no state of length L."""
  x = params["embed"][ids]
  return jnp.tanh(0.5 * jnp.cumsum(x, axis=1) + x) @ params["out"]


def attention(params, ids):
  """Causal softmax attention: a cache of L positions."""
  x = params["embed"][ids]
  t = ids.shape[1]
  scores = jnp.einsum("btd,bsd->bts", x @ params["wq"], x @ params["wk"])
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9)
  return jnp.tanh(jax.nn.softmax(scores, -1) @ x + x) @ params["out"]


MODELS = {"cumulative": cumulative, "attention": attention}
PARAMS = make_params()


@functools.lru_cache(maxsize=None)
def _pair(name, batch_axis=None, vocab=V):
  return StepPair(MODELS[name], (make_params(0, vocab),),
                  jnp.zeros((B, L), jnp.int32), axis=1,
                  batch_axis=batch_axis)


@functools.lru_cache(maxsize=None)
def _apply(name):
  return jax.jit(MODELS[name])


def _ids(seed, length, vocab=V):
  return jax.random.randint(jax.random.key(seed), (B, length), 0, vocab,
                            jnp.int32)


def _greedy_alone(name, params, seq, steps):
  """Greedy tokens for one row by re-running the model on the growing
  sequence (``seq``: its prompt, 1-d)."""
  seq, out = list(np.asarray(seq)), []
  for _ in range(steps):
    # right-padded to one length (the models are causal): one compile
    padded = np.zeros((1, _NAIVE_LENGTH), np.int32)
    padded[0, :len(seq)] = seq
    logits = _apply(name)(params, jnp.asarray(padded))[0, len(seq) - 1]
    out.append(int(jnp.argmax(logits)))
    seq.append(out[-1])
  return out


_NAIVE_LENGTH = 4 * L


def _greedy_rows(name, params, prompt, steps, lengths=None):
  lengths = [prompt.shape[1]] * B if lengths is None else lengths
  return np.array([_greedy_alone(name, params, prompt[b, :n], steps)
                   for b, n in enumerate(lengths)])


def _stopped(tokens, stops, pad=PAD):
  """``tokens`` with every entry after a row's first stop token set to pad;
  also the index of each row's first stop (None: it never stops)."""
  out, first = np.array(tokens), []
  for row in out:
    hits = [i for i, t in enumerate(row) if t in stops]
    first.append(hits[0] if hits else None)
    if hits:
      row[hits[0] + 1:] = pad
  return out, first


# -- generate ------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_greedy_generate_equals_a_python_loop(name, batch_axis):
  pair = _pair(name, batch_axis)
  prompt, steps = _ids(1, 3), L - 2
  got = pair.generate(PARAMS, prompt, steps, sampling.greedy)
  want = _greedy_rows(name, PARAMS, prompt, steps)
  np.testing.assert_array_equal(got, want)
  # the keyword form, the same loop
  same = pair.generate(PARAMS, prompt=prompt, steps=steps,
                       sample=sampling.greedy, rng=3)
  np.testing.assert_array_equal(same, want)


def test_generate_argument_forms():
  pair = _pair("cumulative")
  prompt = _ids(2, 2)
  sample = sampling.temperature(1.0)
  a = pair.generate(PARAMS, prompt, 4, sample, jax.random.key(5))
  b = pair.generate(PARAMS, prompt, 4, sample, rng=jax.random.key(5))
  c = pair.generate(PARAMS, prompt=prompt, steps=4, sample=sample, rng=5)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  with pytest.raises(TypeError, match="by position and by name"):
    pair.generate(PARAMS, prompt, 4, sample, prompt=prompt)
  with pytest.raises(TypeError, match="sample missing"):
    pair.generate(PARAMS, prompt, 4)
  with pytest.raises(TypeError, match="takes params"):
    pair.generate(prompt=prompt, steps=4, sample=sample)


def test_equal_samplers_reuse_the_compiled_loop():
  pair = StepPair(cumulative, (PARAMS,), jnp.zeros((B, L), jnp.int32), 1)
  prompt = _ids(3, 2)
  pair.generate(PARAMS, prompt, 3, sampling.top_k(3, temperature=0.5))
  pair.generate(PARAMS, prompt, 3, sampling.top_k(3, temperature=0.5), rng=1)
  assert pair.trace_counts["generate"] == 1
  pair.generate(PARAMS, prompt, 3, sampling.top_k(2))
  assert pair.trace_counts["generate"] == 2


@pytest.mark.parametrize("sampler", [sampling.top_k(2),
                                     sampling.top_p(0.6, temperature=2.0)])
def test_sampled_tokens_are_allowed_by_the_model(sampler):
  """Each generated token is among the sampler's candidates for the model's
  logits given the sequence so far."""
  pair = _pair("attention", 0)
  prompt, steps = _ids(4, 2), 6
  got = np.asarray(pair.generate(PARAMS, prompt, steps, sampler, rng=7))
  seqs = np.concatenate([np.asarray(prompt), got], axis=1)
  logits = np.asarray(attention(PARAMS, jnp.asarray(seqs)))
  for b in range(B):
    for t in range(steps):
      y = logits[b, 1 + t]                    # predicts seqs[b, 2 + t]
      order = np.argsort(-y)
      if isinstance(sampler, sampling._TopK):
        allowed = order[:2]
      else:
        probs = np.exp((y - y.max()) / 2.0)
        probs = probs[order] / probs.sum()
        allowed = order[:np.searchsorted(np.cumsum(probs), 0.6) + 1]
      assert got[b, t] in allowed, (b, t)


# -- stop tokens ---------------------------------------------------------------
def _stop_case(name, batch_axis, lengths):
  pair = _pair(name, batch_axis)
  prompt, steps = _ids(5, 4), 6
  want = _greedy_rows(name, PARAMS, prompt, steps, lengths)
  stops = (int(want[0, 1]),)          # row 0 stops at its second token
  expected, first = _stopped(want, stops)
  assert first[0] is not None and (expected != PAD).sum() > B
  return pair, prompt, steps, stops, expected, first


@pytest.mark.parametrize("name", list(MODELS))
def test_stop_tokens_pad_the_rest_of_a_row(name):
  pair, prompt, steps, stops, expected, _ = _stop_case(name, None, None)
  got = pair.generate(PARAMS, prompt, steps, sampling.greedy,
                      stop_tokens=stops, pad=PAD)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lengths", [None, [4, 1, 3]])
def test_stop_tokens_with_rows_stop_each_rows_carry(name, lengths):
  pair, prompt, steps, stops, expected, first = _stop_case(name, 0, lengths)
  got = pair.generate(PARAMS, prompt, steps, sampling.greedy,
                      stop_tokens=list(stops), pad=PAD, lengths=lengths)
  np.testing.assert_array_equal(got, expected)
  # a stopped row's carry stayed where it was: its prompt, then the tokens
  # before the stop token (the last token generated is never run)
  n = np.array(lengths or [prompt.shape[1]] * B)
  ragged = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  _, carry = pair._generate([PARAMS], prompt, ragged, jax.random.key(0),
                            steps=steps, sample=sampling.greedy, stop=stops,
                            pad=PAD)
  want = n + np.array([steps - 1 if f is None else f for f in first])
  np.testing.assert_array_equal(pair.positions(carry), want)


def test_without_rows_the_loop_ends_when_every_row_stopped():
  pair = _pair("attention")
  prompt, steps = _ids(6, 3), 5
  want = _greedy_rows("attention", PARAMS, prompt, steps)
  every = tuple(range(V))                 # every row stops at once
  tokens, carry = pair._generate([PARAMS], prompt, None, jax.random.key(0),
                                 steps=steps, sample=sampling.greedy,
                                 stop=every, pad=PAD)
  np.testing.assert_array_equal(tokens[:, 0], want[:, 0])
  assert (np.asarray(tokens[:, 1:]) == PAD).all()
  assert int(pair.positions(carry)) == 3           # no step was run
  # one row stops early: the shared position goes on for the others
  stops = next((int(t),) for t in want[0]
               if not all(t in row for row in want))
  _, first = _stopped(want, stops)
  assert None in first and first[0] is not None
  _, carry = pair._generate([PARAMS], prompt, None, jax.random.key(0),
                            steps=steps, sample=sampling.greedy, stop=stops,
                            pad=PAD)
  assert int(pair.positions(carry)) == 3 + steps - 1


def test_stop_token_errors():
  pair = _pair("cumulative")
  prompt = _ids(7, 2)
  with pytest.raises(TypeError, match="stop_tokens"):
    pair.generate(PARAMS, prompt, 2, sampling.greedy, stop_tokens=[1.5])
  with pytest.raises(TypeError, match="pad"):
    pair.generate(PARAMS, prompt, 2, sampling.greedy, stop_tokens=[1],
                  pad=0.5)
  floats = StepPair(lambda w, xs: jnp.cumsum(xs, 0) * w, (1.0,),
                    jnp.ones((6,)))
  with pytest.raises(TypeError, match="integer token ids"):
    floats.generate(1.0, jnp.ones(2), 3, lambda k, y: y, stop_tokens=[1])


# -- stream --------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_stream_concatenates_to_generate(name):
  pair = StepPair(MODELS[name], (PARAMS,), jnp.zeros((B, L), jnp.int32), 1)
  prompt, steps, sample = _ids(8, 2), L - 1, sampling.temperature(1.5)
  want = pair.generate(PARAMS, prompt, steps, sample, rng=11)
  chunks = list(pair.stream(PARAMS, prompt, steps, sample, rng=11, chunk=2))
  assert [c.shape for c in chunks] == [(B, 2)] * 4 + [(B, 1)]
  np.testing.assert_array_equal(jnp.concatenate(chunks, 1), want)
  # the full chunks after the first share one compiled loop
  assert pair.trace_counts["stream_next"] == 2          # sizes 2 and 1
  assert list(pair.stream(PARAMS, prompt, 0, sample)) == []


@pytest.mark.parametrize("name", list(MODELS))
def test_stream_with_rows_stop_tokens_and_lengths(name):
  pair = _pair(name, 0)
  prompt, steps, lengths = _ids(9, 4), 6, [4, 1, 3]
  want = _greedy_rows(name, PARAMS, prompt, steps, lengths)
  stops = (int(want[1, 2]),)
  expected, _ = _stopped(want, stops)
  for chunk in (4, 5, 16):
    chunks = list(pair.stream(PARAMS, prompt, steps, sampling.greedy,
                              lengths=lengths, stop_tokens=stops, pad=PAD,
                              chunk=chunk))
    assert all(c.shape[1] <= chunk for c in chunks)
    np.testing.assert_array_equal(jnp.concatenate(chunks, 1), expected)
  sample = sampling.top_p(0.9)
  np.testing.assert_array_equal(
      jnp.concatenate(list(pair.stream(PARAMS, prompt, steps, sample, rng=2,
                                       lengths=lengths, stop_tokens=stops,
                                       chunk=4)), 1),
      pair.generate(PARAMS, prompt, steps, sample, rng=2, lengths=lengths,
                    stop_tokens=stops))


def test_stream_checks_its_arguments_when_called():
  pair = _pair("attention")
  with pytest.raises(ValueError, match="chunk"):
    pair.stream(PARAMS, _ids(1, 2), 3, sampling.greedy, chunk=0)
  with pytest.raises(ValueError, match="L=10"):
    pair.stream(PARAMS, _ids(1, 4), L, sampling.greedy)


# -- take_rows -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_take_rows_forks_and_reorders_rows(name):
  pair = _pair(name, 0)
  prompt, lengths = _ids(10, 4), [4, 1, 3]
  carry, _ = pair.prefill(PARAMS, prompt, lengths=lengths)
  x = _ids(11, 1)[:, 0]
  _, y = pair.step(PARAMS, carry, x)
  order = [2, 0, 0, 1]                              # 4 rows from 3
  taken = pair.take_rows(carry, order)
  assert pair.positions(taken).tolist() == [lengths[i] for i in order]
  _, y2 = pair.step(PARAMS, taken, x[jnp.array(order)])
  np.testing.assert_allclose(y2, y[jnp.array(order)], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[0, 3\)"):
    pair.take_rows(carry, [3])
  with pytest.raises(TypeError, match="batch_axis"):
    _pair(name).take_rows(pair.init(PARAMS), [0])


# -- beam search ---------------------------------------------------------------
def _log_probs(name, params, seqs, start):
  """Scores of continuations: ``seqs`` [N, n + steps], the first ``start``
  tokens being the prompt; the sum of log-softmax of the rest."""
  logp = jax.nn.log_softmax(_apply(name)(params, jnp.asarray(seqs)), -1)
  logp = np.asarray(logp)
  steps = seqs.shape[1] - start
  return sum(logp[np.arange(len(seqs)), start - 1 + t, seqs[:, start + t]]
             for t in range(steps))


def _brute_force(name, params, prompt, steps, vocab):
  """Every continuation of ``prompt`` (1-d) and its score, best first."""
  conts = np.array(list(itertools.product(range(vocab), repeat=steps)))
  seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
  scores = _log_probs(name, params, seqs, len(prompt))
  order = np.argsort(-scores, kind="stable")
  return conts[order], scores[order]


def _reference_beam(name, params, prompt, steps, beam, vocab):
  """Beam search in Python: one sequence at a time through the model."""
  beams = [((), 0.0)]
  for _ in range(steps):
    candidates = []
    for seq, score in beams:
      ids = jnp.asarray([list(prompt) + list(seq)], jnp.int32)
      logp = np.asarray(jax.nn.log_softmax(_apply(name)(params, ids)[0, -1]))
      candidates += [(seq + (tok,), score + logp[tok])
                     for tok in range(vocab)]
    beams = sorted(candidates, key=lambda c: -c[1])[:beam]
  return np.array([s for s, _ in beams]), np.array([c for _, c in beams])


@pytest.mark.parametrize("name", list(MODELS))
def test_beam_of_one_is_greedy(name):
  pair = _pair(name, 0)
  prompt, steps, lengths = _ids(12, 4), 5, [4, 2, 3]
  tokens, scores = pair.beam_search(PARAMS, prompt, steps, 1,
                                    lengths=lengths)
  want = _greedy_rows(name, PARAMS, prompt, steps, lengths)
  assert tokens.shape == (B, 1, steps) and scores.shape == (B, 1)
  np.testing.assert_array_equal(tokens[:, 0], want)
  for b, n in enumerate(lengths):
    seq = np.concatenate([prompt[b, :n], want[b]])[None]
    np.testing.assert_allclose(scores[b, 0], _log_probs(name, PARAMS, seq, n),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_beam_search_finds_the_best_sequences(name):
  """With V=3 and 3 steps, beams of 9 = V^2 keep every prefix: the result is
  the brute force's 9 best; beams of 27 return every sequence, ordered."""
  vocab, steps, lengths = 3, 3, [4, 1, 2]
  pair, params = _pair(name, 0, vocab), make_params(0, vocab)
  prompt = _ids(13, 4, vocab)
  for beam in (9, 27):
    tokens, scores = pair.beam_search(params, prompt=prompt, steps=steps,
                                      beam_size=beam, lengths=lengths)
    assert tokens.shape == (B, beam, steps)
    for b, n in enumerate(lengths):
      want_tokens, want_scores = _brute_force(name, params,
                                              np.asarray(prompt[b, :n]),
                                              steps, vocab)
      np.testing.assert_array_equal(tokens[b], want_tokens[:beam])
      np.testing.assert_allclose(scores[b], want_scores[:beam], rtol=1e-4,
                                 atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_narrow_beams_equal_a_reference_beam_search(name):
  vocab, steps = 4, 3
  pair, params = _pair(name, 0, vocab), make_params(0, vocab)
  prompt = _ids(14, 2, vocab)
  for beam in (2, 3):
    tokens, scores = pair.beam_search(params, prompt, steps, beam)
    for b in range(B):
      want_tokens, want_scores = _reference_beam(
          name, params, np.asarray(prompt[b]), steps, beam, vocab)
      np.testing.assert_array_equal(tokens[b], want_tokens)
      np.testing.assert_allclose(scores[b], want_scores, rtol=1e-4,
                                 atol=1e-4)


def test_beam_search_edges_and_errors():
  vocab = 3
  pair, params = _pair("cumulative", 0, vocab), make_params(0, vocab)
  prompt = _ids(15, 2, vocab)
  tokens, scores = pair.beam_search(params, prompt, 1, 5)    # 3 sequences
  assert np.isfinite(scores[:, :3]).all()
  assert np.isneginf(scores[:, 3:]).all()
  with pytest.raises(TypeError, match="batch_axis"):
    _pair("cumulative", None, vocab).beam_search(params, prompt, 2, 2)
  with pytest.raises(ValueError, match="beam_size"):
    pair.beam_search(params, prompt, 2, 0)
  with pytest.raises(ValueError, match="steps"):
    pair.beam_search(params, prompt, 0, 2)
  with pytest.raises(ValueError, match="L=10"):
    _pair("attention", 0, vocab).beam_search(params, prompt, L, 2)


# -- Stepper: snapshot / restore -----------------------------------------------
@pytest.mark.parametrize("batch_axis", [None, 0])
def test_snapshot_survives_donated_steps_and_restores(batch_axis):
  pair = _pair("attention", batch_axis)
  stepper = pair.bind(PARAMS)
  lengths = None if batch_axis is None else [3, 1, 2]
  stepper.reset(_ids(16, 3), lengths=lengths)
  saved = stepper.snapshot()
  positions = np.copy(stepper.positions)
  xs = _ids(17, 3)
  first = [stepper(xs[:, t]) for t in range(3)]       # donating steps
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(saved.carry))
  for _ in range(2):                                   # the snapshot lasts
    stepper.restore(saved)
    np.testing.assert_array_equal(stepper.positions, positions)
    again = [stepper(xs[:, t]) for t in range(3)]
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a, b)
  other = pair.bind(PARAMS)                      # another stepper, same pair
  other.restore(saved)
  np.testing.assert_array_equal(other(xs[:, 0]), first[0])
  with pytest.raises(TypeError, match="structure"):
    _pair("cumulative", batch_axis).bind(PARAMS).restore(saved)


# -- conversion on first use ---------------------------------------------------
def _counting_pair(**kwargs):
  traces = []

  def fun(params, ids):
    traces.append(1)
    return cumulative(params, ids)
  kwargs.setdefault("num_unscanned", 1)
  return StepPair(fun, None, jnp.zeros((B, L), jnp.int32), 1, **kwargs), traces


def test_lazy_pair_converts_at_its_first_call():
  pair, traces = _counting_pair(names=("variables",))
  assert not traces                                   # nothing converted
  with pytest.raises(RuntimeError, match="first call with the variables"):
    pair.max_length
  with pytest.raises(RuntimeError, match="variables"):
    pair.carry_spec()
  with pytest.raises(TypeError, match="init takes variables"):
    pair.init()
  assert not traces
  carry = pair.init(PARAMS)
  assert traces and pair.max_length is None
  assert jax.tree.structure(pair.carry_spec()) == jax.tree.structure(carry)
  prompt = _ids(18, 3)
  want = _greedy_rows("cumulative", PARAMS, prompt, 4)
  np.testing.assert_array_equal(
      pair.generate(PARAMS, prompt, 4, sampling.greedy), want)
  # another value of the same shapes: no new conversion
  count = len(traces)
  pair.prefill(make_params(1), prompt)
  pair.step(make_params(2), carry, prompt[:, 0])
  assert len(traces) == count


def test_lazy_pair_refuses_other_shapes_naming_them():
  pair, _ = _counting_pair()
  pair.prefill(PARAMS, _ids(19, 2))
  wider = dict(PARAMS, out=jnp.zeros((D, V + 1)))
  with pytest.raises(TypeError, match=r"params\['out'\] is float32\[8, 8\], "
                     r"was float32\[8, 7\]"):
    pair.prefill(wider, _ids(19, 2))
  fewer = {k: v for k, v in PARAMS.items() if k != "wq"}
  with pytest.raises(TypeError, match=r"params\['wq'\] is missing"):
    pair.init(fewer)
  halves = jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS)
  with pytest.raises(TypeError, match="float16"):
    pair.generate(halves, _ids(19, 2), 2, sampling.greedy)
  with pytest.raises(TypeError, match="differs"):
    pair.bind(wider)


def test_lazy_pair_from_private_compiled_functions_and_jit():
  """Adapters call the compiled functions directly; a jit over the public
  ones converts from tracers."""
  ids = _ids(20, 3)
  want = cumulative(PARAMS, ids)
  pair, _ = _counting_pair()
  carry, out = pair._prefill([PARAMS], ids[:, :2], None)
  np.testing.assert_allclose(out, want[:, :2], rtol=1e-5, atol=1e-5)
  other, _ = _counting_pair()
  carry, y = jax.jit(other.step)(PARAMS, carry, ids[:, 2])
  np.testing.assert_allclose(y, want[:, 2], rtol=1e-5, atol=1e-5)


def test_bind_with_unscanned_from_and_example_unscanned():
  class Model:                          # stands for an NNX module
    def __init__(self, params):
      self.params = params
  made = []

  def examples():
    made.append(1)
    return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         PARAMS),)
  pair, _ = _counting_pair(unscanned_from=lambda model: (model.params,),
                           example_unscanned=examples)
  stepper = pair.bind(Model(PARAMS))
  assert isinstance(stepper, Stepper) and not made
  ys = stepper.reset(_ids(21, 4))
  np.testing.assert_allclose(ys, cumulative(PARAMS, _ids(21, 4)), rtol=1e-5,
                             atol=1e-5)
  lazy, _ = _counting_pair(example_unscanned=examples)
  assert lazy.max_length is None and made      # converted from the examples
  with pytest.raises(TypeError, match="converted with"):
    lazy.init(dict(PARAMS, out=jnp.zeros((D, 3))))


def test_constructor_errors():
  with pytest.raises(TypeError, match="num_unscanned"):
    StepPair(cumulative, None, jnp.zeros((B, L), jnp.int32), 1)
  with pytest.raises(ValueError, match="names"):
    StepPair(cumulative, None, jnp.zeros((B, L), jnp.int32), 1,
             num_unscanned=1, names=("params", "state"))
  assert scanagram.StepPair is StepPair and HaikuStepPair is StepPair


# -- the Haiku adapter ---------------------------------------------------------
def _batch_norm_forward(ids, is_training=False):
  x = hk.Embed(V, D)(ids)
  x = hk.BatchNorm(True, True, 0.9)(x, is_training=is_training)
  return hk.Linear(V)(jnp.cumsum(x, axis=1) * 0.3)


def test_haiku_batch_norm_converts_without_params():
  """model.init(rng, xs) alone cannot make BatchNorm's averages; the pair
  converts at its first call with the real params and state."""
  model = hk.transform_with_state(_batch_norm_forward)
  ids = _ids(22, L)
  pair = to_step(model, ids, axis=1)
  with pytest.raises(RuntimeError, match="call init, prefill"):
    pair.max_length
  params, state = model.init(jax.random.key(0), ids, is_training=True)
  state = jax.tree.map(lambda s: s + 0.5, state)   # not the defaults
  want = model.apply(params, state, None, ids)[0]
  carry, out = pair.prefill(params, state, ids[:, :4])
  ys = []
  for t in range(4, L):
    carry, y = pair.step(params, state, carry, ids[:, t])
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate([out, jnp.stack(ys, 1)], 1),
                             want, rtol=1e-4, atol=1e-4)
  assert pair.has_state and pair.max_length is None
  with pytest.raises(TypeError, match="takes params, state"):
    pair.init(params)


def test_haiku_pair_generates_streams_and_searches():
  def forward(ids):
    x = hk.Embed(V, D)(ids)
    x = hk.Conv1D(D, 3, padding=hk.pad.causal)(x)
    return hk.Linear(V)(jnp.tanh(x))
  model = hk.without_apply_rng(hk.transform(forward))
  ids = _ids(23, L)
  params = model.init(jax.random.key(0), ids)
  pair = to_step(model, ids, axis=1, batch_axis=0)
  prompt, steps = ids[:, :3], 5
  seq, want = prompt, []
  for _ in range(steps):
    x = jnp.argmax(model.apply(params, seq)[:, -1], -1).astype(jnp.int32)
    want.append(x)
    seq = jnp.concatenate([seq, x[:, None]], 1)
  want = jnp.stack(want, 1)
  np.testing.assert_array_equal(
      pair.generate(params, prompt, steps, sampling.greedy), want)
  np.testing.assert_array_equal(
      jnp.concatenate(list(pair.stream(params, prompt, steps,
                                       sampling.greedy, chunk=2)), 1), want)
  tokens, _ = pair.beam_search(params, prompt, steps, 1)
  np.testing.assert_array_equal(tokens[:, 0], want)


def test_default_axis_warns_on_a_batch_major_example():
  """Converting [B, T, ...] over its batch axis silently would be wrong:
  the default axis warns when axis 1 is longer; an explicit axis does not."""
  import warnings
  fun = lambda w, xs: jnp.cumsum(xs, axis=1) * w  # noqa: E731
  with pytest.warns(UserWarning, match="pass axis=1"):
    StepPair(fun, (1.0,), jnp.ones((2, 9)), None)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    StepPair(fun, (1.0,), jnp.ones((2, 9)), 1, batch_axis=0)
    StepPair(fun, (1.0,), jnp.ones((2, 9)), 0)
    StepPair(fun, (1.0,), jnp.ones((9, 2)), None)
