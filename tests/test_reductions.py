"""Reductions, argmax/argmin, custom lax.reduce, sort, top_k and cumulative
ops: over other axes they are per-position; cumulative ops along the scanned
axis carry their running value; everything over the scanned axis is
refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import check_refused, check_scan, random_like

L = 6


def xs_of(shape=(L, 4), dtype=jnp.float32, seed=0):
  return random_like(jnp.zeros(shape, dtype), seed)


def test_reductions_over_other_axes():
  def f(xs):                                   # [L, 3, 4]
    return (xs.sum(-1), xs.max(1), xs.min((1, 2)), jnp.prod(xs, 2),
            (xs > 0).all(-1), (xs > 0).any(1), xs.mean(-1), xs.var(1),
            jax.nn.logsumexp(xs, axis=-1), jax.nn.softmax(xs, axis=1))
  check_scan(f, xs_of((L, 3, 4)))


def test_reductions_with_time_moved():
  def f(xs):                                   # [L, 3, 4]
    y = jnp.transpose(xs, (1, 2, 0))           # [3, 4, L]
    return y.sum(0).T, y.max((0, 1)), jnp.argmax(y, axis=1).T
  check_scan(f, xs_of((L, 3, 4)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, bool])
def test_integer_and_bool_reductions(dtype):
  def f(xs):
    out = {"max": xs.max(-1), "min": xs.min(-1), "argmax": xs.argmax(-1),
           "argmin": jnp.argmin(xs, 1)}
    if dtype == bool:
      out.update(all=xs.all(-1), any=xs.any(-1),
                 xor=lax.reduce_xor_p.bind(xs, axes=(1,)))
    else:
      out.update(sum=xs.sum(-1), prod=jnp.prod(xs, -1),
                 xor=lax.reduce_xor_p.bind(xs, axes=(1,)),
                 band=lax.reduce_and_p.bind(xs, axes=(1,)),
                 bor=lax.reduce_or_p.bind(xs, axes=(1,)))
    return out
  check_scan(f, xs_of(dtype=dtype))


def test_bf16_reductions():
  def f(xs):
    return xs.sum(-1), xs.max(-1), jnp.argmax(xs, -1), jnp.cumsum(xs, 1)
  check_scan(f, xs_of(dtype=jnp.bfloat16))


def test_argmax_argmin_index_dtypes():
  def f(xs):
    return (lax.argmax(xs, 1, jnp.int8), lax.argmin(xs, 1, jnp.uint16),
            jnp.argmax(xs, axis=-1, keepdims=True))
  check_scan(f, xs_of())


def test_custom_reduce_computation():
  def f(xs):                                   # [L, 4]
    s = lax.reduce(xs, 1., lambda a, b: a * b + 0.5, (1,))
    m = lax.reduce(xs, -jnp.inf, lax.max, (1,))
    return s, m
  check_scan(f, xs_of(), tol=1e-4)


def test_variadic_reduce_max_and_argmax():
  def f(xs):                                   # [L, 5]
    idx = lax.broadcasted_iota(jnp.int32, xs.shape, 1)

    def pick(a, b):
      (va, ia), (vb, ib) = a, b
      take_a = (va > vb) | ((va == vb) & (ia < ib))
      return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)
    v, i = lax.reduce((xs, idx), (-jnp.inf, 0), pick, (1,))
    return v, i
  check_scan(f, xs_of((L, 5)))


def test_variadic_reduce_two_scanned():
  def f(ab):
    a, b = ab
    return lax.reduce((a, b), (0., 1.),
                      lambda x, y: (x[0] + y[0], x[1] * y[1]), (1,))
  check_scan(f, (xs_of(seed=1), xs_of(seed=2)), tol=1e-4)


def test_sort_other_axes():
  def f(xs):                                   # [L, 5]
    a = jnp.sort(xs, axis=1)
    b = jnp.argsort(-xs, axis=1)
    c, d = lax.sort((xs, xs * 2), dimension=1, num_keys=1)
    e = jnp.sort(xs.T, axis=0).T               # time moved to axis 1
    return a, b, c + d, e
  check_scan(f, xs_of((L, 5)))


def test_sort_integer_keys_with_payload():
  def f(ab):
    k, v = ab
    return lax.sort((k, v), dimension=1, num_keys=1, is_stable=True)
  check_scan(f, (xs_of((L, 5), jnp.int32, 1), xs_of((L, 5), seed=2)))


def test_top_k_other_axis():
  check_scan(lambda xs: lax.top_k(xs, 2), xs_of((L, 5)))
  check_scan(lambda xs: lax.top_k(xs.reshape(L, 1, 5), 3)[0][:, 0],
             xs_of((L, 5)))


def test_top_k_time_moved_to_front_of_other_axes():
  def f(xs):                                   # [L, 3, 5]
    y = jnp.transpose(xs, (1, 0, 2))           # [3, L, 5]
    v, i = lax.top_k(y, 2)                     # [3, L, 2]
    return jnp.transpose(v, (1, 0, 2)), jnp.transpose(i, (1, 0, 2))
  check_scan(f, xs_of((L, 3, 5)))


def test_rev_other_axis():
  check_scan(lambda xs: (lax.rev(xs, (1,)), jnp.flip(xs, -1)),
             xs_of((L, 5)))


CUMULATIVE = {
    "cumsum": lax.cumsum, "cumprod": lax.cumprod, "cummax": lax.cummax,
    "cummin": lax.cummin, "cumlogsumexp": lax.cumlogsumexp,
}


@pytest.mark.parametrize("name", sorted(CUMULATIVE))
def test_cumulative_over_other_axes(name):
  op = CUMULATIVE[name]

  def f(xs):                                   # [L, 4]
    return op(xs, axis=1), op(xs, axis=1, reverse=True)
  check_scan(f, xs_of(), tol=1e-4)


@pytest.mark.parametrize("name", sorted(CUMULATIVE))
def test_cumulative_along_time(name):
  op = CUMULATIVE[name]
  xs = xs_of() * (0.5 if name == "cumprod" else 1.)
  check_scan(lambda xs: op(xs, axis=0), xs, prefill_lengths=range(L + 1),
             tol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bfloat16])
def test_cumulative_along_time_dtypes(dtype):
  names = ["cumsum", "cummax", "cummin", "cumprod"]
  check_scan(lambda xs: {n: CUMULATIVE[n](xs, axis=0) for n in names},
             xs_of((L, 3), dtype), prefill_lengths=[0, 2, L])


def test_jnp_cumulative_along_time():
  def f(xs):
    return (jnp.cumsum(xs, 0), jnp.cumprod(xs * 0.5, 0),
            lax.cummax(xs, 0), jnp.cumsum(xs > 0, axis=0))
  check_scan(f, xs_of(), prefill_lengths=range(L + 1))


def test_cumulative_along_moved_time_axis():
  def f(xs):                                   # [L, 2, 3]
    y = jnp.transpose(xs, (1, 2, 0))           # time on axis 2
    y = lax.cumsum(y, axis=2) + lax.cummax(y, axis=2)
    return jnp.transpose(y, (2, 0, 1))
  check_scan(f, xs_of((L, 2, 3)), prefill_lengths=range(L + 1))


def test_running_mean_and_softmax_normaliser():
  def f(xs):
    n = jnp.arange(1, L + 1, dtype=jnp.float32)[:, None]
    mean = jnp.cumsum(xs, 0) / n
    lse = lax.cumlogsumexp(xs, axis=0)
    return mean, jnp.exp(xs - lse), lax.cummax(mean, axis=0)
  check_scan(f, xs_of(), prefill_lengths=range(L + 1), tol=1e-4)


def test_cumsum_of_cumsum_and_of_shift():
  def f(xs):
    prev = jnp.concatenate([jnp.zeros((2, 4)), xs[:-2]])
    return jnp.cumsum(jnp.cumsum(xs, 0), 0), jnp.cumsum(prev, 0)
  check_scan(f, xs_of(), prefill_lengths=range(L + 1))


def test_cumsum_of_truncated_with_suffix():
  def f(xs):
    y = jnp.cumsum(xs[:-2], axis=0)
    return jnp.concatenate([y, jnp.ones((2, 4))])
  check_scan(f, xs_of(), prefill_lengths=range(L + 1))


# -- refusals ---------------------------------------------------------------
@pytest.mark.parametrize("op,name", [
    (lambda xs: xs.sum(0), "reduce_sum"),
    (lambda xs: xs.max(0), "reduce_max"),
    (lambda xs: xs.min(0), "reduce_min"),
    (lambda xs: jnp.prod(xs, 0), "reduce_prod"),
    (lambda xs: (xs > 0).any(0), "reduce_or"),
    (lambda xs: (xs > 0).all(0), "reduce_and"),
    (lambda xs: xs.mean(), "reduce_sum"),
    (lambda xs: jnp.argmax(xs, 0), "argmax"),
    (lambda xs: jnp.argmin(xs, 0), "argmin"),
])
def test_refused_reduce_over_time(op, name):
  check_refused(lambda xs: op(xs) + xs, xs_of(), name, "scanned axis 0")


def test_refused_custom_reduce_over_time():
  check_refused(lambda xs: lax.reduce(xs, 0., lax.add, (0,)) + xs,
                xs_of(), "reduce", "scanned axis 0")
  check_refused(lambda xs: xs.T.sum(1) + xs, xs_of(), "reduce_sum",
                "scanned axis 1")


def test_refused_softmax_over_time():
  check_refused(lambda xs: jax.nn.softmax(xs, axis=0), xs_of(),
                "scanned axis 0")


def test_refused_sort_along_time():
  check_refused(lambda xs: jnp.sort(xs, axis=0), xs_of(), "sort",
                "scanned axis 0")
  check_refused(lambda xs: jnp.argsort(xs.T, axis=1).T, xs_of(), "sort",
                "scanned axis 1")


def test_refused_top_k_along_time():
  check_refused(lambda xs: lax.top_k(xs.T, L)[0].T, xs_of(), "top_k",
                "scanned axis 1")


def test_refused_reverse_along_time():
  check_refused(lambda xs: jnp.flip(xs, 0), xs_of(), "rev",
                "scanned axis 0")


@pytest.mark.parametrize("name", sorted(CUMULATIVE))
def test_refused_reverse_cumulative_along_time(name):
  op = CUMULATIVE[name]
  check_refused(lambda xs: op(xs, axis=0, reverse=True), xs_of(), name,
                "reverse")


def test_refused_jnp_reverse_cumsum():
  check_refused(lambda xs: jnp.flip(jnp.cumsum(jnp.flip(xs, 0), 0), 0),
                xs_of(), "rev")


def test_variadic_reduce_of_shifted_and_unshifted():
  def f(xs):
    prev = jnp.pad(xs, ((1, 0), (0, 0)))[:L]
    return lax.reduce((prev, xs), (0., 0.),
                      lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])),
                      (1,))
  check_scan(f, xs_of(), prefill_lengths=range(L + 1))
