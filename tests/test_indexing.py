"""gather and scatter: embedding lookups, indexing other axes, refusals when
the indices pick positions of time."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from conftest import check_refused, check_scan, random_like

L = 6
TABLE = jax.random.normal(jax.random.key(1), (7, 4))
IDX = jnp.array([3, 0, 2])


def ids(seed=0, length=L, high=7):
  return jax.random.randint(jax.random.key(seed), (length,), 0, high)


# -- gather ---------------------------------------------------------------
def test_embedding_lookup_of_scanned_ids():
  check_scan(lambda t: TABLE[t], ids())


def test_embedding_take_and_one_hot_mix():
  def f(t):
    e = jnp.take(TABLE, t, axis=0)
    return e * jnp.arange(L, dtype=jnp.float32)[:, None]
  check_scan(f, ids(1))


def test_embedding_lookup_batched_ids():
  # ids [L, B]: scanned along axis 0 of the indices, gathered rows [L, B, D]
  t = jax.random.randint(jax.random.key(2), (L, 2), 0, 7)
  check_scan(lambda t: TABLE[t].sum(-1), t)


def test_embedding_lookup_transposed_table():
  # the table's rows along axis 1: output [D, L], scanned along axis 1
  check_scan(lambda t: jnp.take(TABLE.T, t, axis=1).T, ids(3))


def test_embedding_lookup_with_modes():
  t = jax.random.randint(jax.random.key(4), (L,), -9, 9)
  check_scan(lambda t: jnp.take(TABLE, t, axis=0, mode="clip"), t)
  check_scan(lambda t: jnp.take(TABLE, t, axis=0, mode="fill",
                                fill_value=-1.), t)


def test_embedding_of_shifted_ids():
  # teacher forcing: the input at t is the token at t - 1
  def f(t):
    prev = jnp.concatenate([jnp.zeros((1,), t.dtype), t[:-1]])
    return TABLE[prev] + TABLE[t]
  check_scan(f, ids(5), prefill_lengths=range(L + 1))


def test_gather_other_axis_of_scanned_operand():
  xs = random_like(jnp.zeros((L, 5)))
  check_scan(lambda xs: xs[:, IDX], xs)
  check_scan(lambda xs: jnp.take(xs, IDX, axis=1), xs)
  check_scan(lambda xs: xs[:, 1], xs)
  check_scan(lambda xs: xs[:, ::-1], xs)


def test_gather_other_axis_scanned_axis_moved():
  xs = random_like(jnp.zeros((L, 3, 5)))

  def f(xs):
    y = jnp.moveaxis(xs, 0, 2)  # [3, 5, L]
    y = y[IDX[:2]]              # [2, 5, L]
    y = jnp.take(y, IDX, axis=1)  # [2, 3, L]
    return jnp.moveaxis(y, 2, 0)
  check_scan(f, xs)


def test_gather_other_axis_integer_and_bf16():
  check_scan(lambda xs: xs[:, IDX] * 2,
             random_like(jnp.zeros((L, 4), jnp.int32)))
  check_scan(lambda xs: jnp.take(xs, IDX, axis=1),
             random_like(jnp.zeros((L, 4), jnp.bfloat16)))


def test_gather_with_unscanned_full_length_indices():
  # a constant [L, 2] index table into the other axis: a batching gather
  # (take_along_axis) where only the operand is scanned
  table = jnp.array(np.random.RandomState(0).randint(0, 5, (L, 2)))
  check_scan(lambda xs: jnp.take_along_axis(xs, table, axis=1),
             random_like(jnp.zeros((L, 5))))


def test_take_along_axis_both_scanned():
  xs = random_like(jnp.zeros((L, 5)))
  idxs = jax.random.randint(jax.random.key(6), (L, 3), 0, 5)
  check_scan(lambda a: jnp.take_along_axis(a[0], a[1], axis=1), (xs, idxs))


def test_take_along_axis_argsort():
  check_scan(lambda xs: jnp.take_along_axis(xs, jnp.argsort(xs, axis=1),
                                            axis=1),
             random_like(jnp.zeros((L, 5))))


def test_take_along_axis_unscanned_operand_scanned_indices():
  table = jax.random.normal(jax.random.key(7), (L, 5))
  idxs = jax.random.randint(jax.random.key(8), (L, 3), 0, 5)
  check_scan(lambda i: jnp.take_along_axis(table, i, axis=1), idxs)


def test_gather_dynamic_index_in_scanned_window():
  # xs[:, i] with an index that is computed from a constant
  def f(xs):
    i = jnp.argmax(jnp.array([0., 3., 1.]))
    return lax.dynamic_index_in_dim(xs, i, axis=1, keepdims=False)
  check_scan(f, random_like(jnp.zeros((L, 3))))


def test_gather_refused_when_indexing_time():
  xs = random_like(jnp.zeros((L, 3)))
  check_refused(lambda xs: xs[jnp.array([0, 2, 1, 3, 5, 4])], xs, "gather",
                "scanned axis 0")
  check_refused(lambda xs: jnp.take(xs, jnp.array([1, 0, 2, 3, 4, 5]),
                                    axis=0), xs, "gather")


def test_gather_refused_reverse_via_indices():
  xs = random_like(jnp.zeros((L, 3)))
  check_refused(lambda xs: xs[jnp.arange(L)[::-1]], xs, "gather")


def test_gather_refused_scanned_indices_into_scanned_operand():
  # xs[t, ids[t]]-like mixing where ids picks rows of time
  xs = random_like(jnp.zeros((L, 3)))
  t = ids(9, high=L)
  check_refused(lambda a: a[0][a[1]], (xs, t), "gather")


def test_gather_refused_two_scanned_axes():
  # operand scanned along a window axis, indices scanned too: output would
  # run along two axes
  xs = random_like(jnp.zeros((L, 5)))
  t = jax.random.randint(jax.random.key(10), (L,), 0, 5)
  check_refused(lambda a: a[0][:, a[1]], (xs, t), "gather")


# -- scatter --------------------------------------------------------------
def test_scatter_set_other_axis():
  xs = random_like(jnp.zeros((L, 5)))
  check_scan(lambda xs: xs.at[:, 2].set(7.), xs)
  check_scan(lambda xs: xs.at[:, IDX].set(0.), xs)


def test_scatter_set_scanned_updates():
  a = random_like((jnp.zeros((L, 5)), jnp.zeros((L,))))
  check_scan(lambda a: a[0].at[:, 2].set(a[1]), a)
  check_scan(lambda a: a[0].at[:, 2].add(a[1]), a)
  check_scan(lambda a: a[0].at[:, 2].mul(a[1]), a)
  check_scan(lambda a: a[0].at[:, 2].min(a[1]), a)
  check_scan(lambda a: a[0].at[:, 2].max(a[1]), a)
  check_scan(lambda a: a[0].at[:, 2].subtract(a[1]), a)


def test_scatter_updates_scanned_operand_unscanned():
  # only the updates depend on the input: the operand is a constant
  base = jnp.arange(L * 5, dtype=jnp.float32).reshape(L, 5)
  check_scan(lambda v: base.at[:, 1].set(v), random_like(jnp.zeros((L,))))
  check_scan(lambda v: jnp.zeros((L, 5)).at[:, IDX].add(v),
             random_like(jnp.zeros((L, 3))))


def test_scatter_add_repeated_indices_and_int():
  rep = jnp.array([1, 1, 3])
  check_scan(lambda a: a[0].at[:, rep].add(a[1]),
             random_like((jnp.zeros((L, 4), jnp.int32),
                          jnp.zeros((L, 3), jnp.int32))))


def test_scatter_one_hot_counts():
  # per-position histogram of token ids: scatter along another axis with
  # indices that are scanned along a batching axis
  def f(t):
    return jax.vmap(lambda ti: jnp.zeros(7).at[ti].add(1.))(t)
  check_scan(f, ids(11))


def test_scatter_along_batching_axis():
  # per-position writes: operand, indices and updates share axis 0
  a = random_like((jnp.zeros((L, 5)), jnp.zeros((L, 2))))
  idxs = jax.random.randint(jax.random.key(12), (L, 2), 0, 5)
  write = jax.vmap(lambda x, i, v: x.at[i].set(v))
  check_scan(lambda a: write(a[0], a[1], a[2]), (a[0], idxs, a[1]))
  add = jax.vmap(lambda x, i, v: x.at[i].add(v))
  check_scan(lambda a: add(a[0], a[1], a[2]), (a[0], idxs, a[1]))
  # only the updates and indices scanned, into a constant buffer
  check_scan(lambda a: add(jnp.ones((L, 5)), a[0], a[1]), (idxs, a[1]))
  # only the operand scanned, constant per-position indices
  check_scan(lambda x: write(x, idxs, jnp.zeros((L, 2))), a[0])


def test_scatter_grad_of_gather():
  # the transpose of xs[:, idx] is a scatter_add
  def f(xs):
    _, pull = jax.vjp(lambda y: y[:, IDX] ** 2, xs)
    return pull(xs[:, IDX] + 1.)[0]
  check_scan(f, random_like(jnp.zeros((L, 5))))


def test_scatter_scanned_axis_moved():
  def f(a):
    xs, v = a
    y = xs.T.at[2].set(v)  # [5, L], write row 2
    return y.T
  check_scan(f, random_like((jnp.zeros((L, 5)), jnp.zeros((L,)))))


def test_scatter_refused_when_writing_time():
  xs = random_like(jnp.zeros((L, 3)))
  check_refused(lambda xs: xs.at[jnp.array([1, 0])].set(0.), xs, "scatter")
  check_refused(lambda xs: xs.at[2].add(1.), xs, "scatter")


def test_scatter_refused_scanned_indices_choose_rows():
  def f(t):
    return jnp.zeros((L, 3)).at[t].add(1.)
  check_refused(f, ids(13, high=L), "scatter")


def test_scatter_refused_scanned_updates_summed_into_other_axis():
  # histogram over the whole sequence: every position writes to the buffer
  def f(t):
    counts = jnp.zeros((7,)).at[t].add(1.)
    return jnp.broadcast_to(counts, (L, 7))
  check_refused(f, ids(14), "scatter")


def test_gather_truncating_time_and_indexing_other_axis():
  # x[:-2, idx] is one gather whose window along time starts at 0
  def f(xs):
    head = xs[:-2, jnp.array([0, 2, 1, 3])]
    return jnp.concatenate([head, jnp.ones((2, 4))])
  check_scan(f, random_like(jnp.zeros((L, 4))), prefill_lengths=range(L + 1))

  def g(xs):                       # of a shifted value: runs ahead
    prev = jnp.pad(xs, ((1, 0), (0, 0)))
    return prev[:L, jnp.array([3, 3, 0])]
  check_scan(g, random_like(jnp.zeros((L, 4))), prefill_lengths=range(L + 1))


def test_gather_refused_window_not_at_start():
  xs = random_like(jnp.zeros((L, 4)))
  check_refused(lambda xs: jnp.concatenate(
      [xs[1:, jnp.array([0, 2])], jnp.ones((1, 2))]), xs, "gather",
      "not from its start")
