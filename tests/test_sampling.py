"""scanagram.sampling: greedy, temperature, top_k, top_p."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanagram import sampling

N, V = 20000, 6
# distinct probabilities, away from the nucleus boundaries tested below
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))


def _draws(sample, logits=LOGITS, seed=0):
  """N independent draws: one key, N rows of the same logits."""
  ids = sample(jax.random.key(seed), jnp.broadcast_to(logits, (N, V)))
  assert ids.shape == (N,) and ids.dtype == jnp.int32
  return np.asarray(ids)


def _frequencies(ids):
  return np.bincount(ids, minlength=V) / len(ids)


def _random_logits(seed, shape=(64, V)):
  return jax.random.normal(jax.random.key(seed), shape) * 3


def test_greedy_is_the_argmax():
  logits = _random_logits(1, (4, 5, V))
  ids = sampling.greedy(None, logits)
  assert ids.shape == (4, 5) and ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, jnp.argmax(logits, -1))


@pytest.mark.parametrize("sampler", [sampling.top_k(1),
                                     sampling.top_k(1, temperature=3.0),
                                     sampling.top_p(1e-6),
                                     sampling.top_p(1e-6, temperature=0.3)])
def test_narrowest_samplers_are_greedy(sampler):
  logits = _random_logits(2)
  want = sampling.greedy(None, logits)
  for seed in range(5):
    np.testing.assert_array_equal(sampler(jax.random.key(seed), logits), want)


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0])
def test_temperature_frequencies_follow_the_softmax(t):
  want = np.asarray(jax.nn.softmax(LOGITS / t))
  got = _frequencies(_draws(sampling.temperature(t)))
  np.testing.assert_allclose(got, want, atol=0.015)


def test_low_temperature_is_nearly_greedy():
  assert (_draws(sampling.temperature(0.01)) == 0).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_top_k_never_leaves_the_k_best(k):
  logits = _random_logits(3)
  best = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
  for seed in range(20):
    ids = np.asarray(sampling.top_k(k, temperature=5.0)(
        jax.random.key(seed), logits))
    assert all(i in row for i, row in zip(ids, best))


def test_top_k_frequencies_are_the_renormalized_best():
  got = _frequencies(_draws(sampling.top_k(3)))
  want = np.zeros(V)
  want[:3] = PROBS[:3] / PROBS[:3].sum()
  np.testing.assert_allclose(got, want, atol=0.015)
  # k >= V: every token
  np.testing.assert_allclose(_frequencies(_draws(sampling.top_k(V + 3))),
                             PROBS, atol=0.015)


@pytest.mark.parametrize("p, kept", [(0.3, 1), (0.5, 2), (0.7, 3), (0.85, 4),
                                     (0.97, 6)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
  """The nucleus: the fewest best tokens whose mass reaches p."""
  got = _frequencies(_draws(sampling.top_p(p)))
  want = np.zeros(V)
  want[:kept] = PROBS[:kept] / PROBS[:kept].sum()
  np.testing.assert_allclose(got, want, atol=0.015)
  assert (got[kept:] == 0).all()


def test_top_p_with_temperature():
  t = 2.0
  tempered = np.asarray(jax.nn.softmax(LOGITS / t))
  kept = int(np.searchsorted(np.cumsum(tempered), 0.6)) + 1
  got = _frequencies(_draws(sampling.top_p(0.6, temperature=t)))
  want = np.zeros(V)
  want[:kept] = tempered[:kept] / tempered[:kept].sum()
  np.testing.assert_allclose(got, want, atol=0.015)


def test_top_p_of_one_is_temperature_sampling():
  logits = _random_logits(4)
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(sampling.top_p(1.0, temperature=0.7)(
        key, logits), sampling.temperature(0.7)(key, logits))


def test_samplers_are_values():
  assert sampling.temperature(0.5) == sampling.temperature(0.5)
  assert hash(sampling.top_k(3)) == hash(sampling.top_k(3))
  assert sampling.top_k(3) != sampling.top_k(3, temperature=0.5)
  assert sampling.top_p(0.9) != sampling.top_p(0.8)


def test_samplers_work_on_low_precision_logits():
  ids = sampling.top_p(0.9)(jax.random.key(0), LOGITS.astype(jnp.bfloat16))
  assert ids.dtype == jnp.int32 and ids.shape == ()


@pytest.mark.parametrize("make, match", [
    (lambda: sampling.temperature(0), "temperature"),
    (lambda: sampling.temperature(-1.0), "temperature"),
    (lambda: sampling.temperature(float("nan")), "temperature"),
    (lambda: sampling.temperature("hot"), "temperature"),
    (lambda: sampling.top_k(0), "k must be an int >= 1"),
    (lambda: sampling.top_k(2.5), "k must be an int >= 1"),
    (lambda: sampling.top_k(True), "k must be an int >= 1"),
    (lambda: sampling.top_k(2, temperature=0.0), "temperature"),
    (lambda: sampling.top_p(0), r"p must be a number in \(0, 1\]"),
    (lambda: sampling.top_p(1.5), r"p must be a number in \(0, 1\]"),
    (lambda: sampling.top_p(-0.1), r"p must be a number in \(0, 1\]"),
    (lambda: sampling.top_p(0.5, temperature=-2), "temperature"),
])
def test_bad_arguments_are_value_errors(make, match):
  with pytest.raises(ValueError, match=match):
    make()
