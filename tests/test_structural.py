"""Structural primitives: broadcast, reshape, transpose, squeeze, expand_dims,
concatenate/split/pad/slice along other axes, dynamic_slice and
dynamic_update_slice; refusals when they mix the scanned axis with others."""
import jax
import jax.numpy as jnp
from jax import lax

from conftest import check_refused, check_scan, random_like

L = 6


def xs_of(shape=(L, 4), dtype=jnp.float32, seed=0):
  return random_like(jnp.zeros(shape, dtype), seed)


def test_broadcast_in_dim():
  def f(xs):
    a = jnp.broadcast_to(xs[:, None, :], (L, 3, 4))
    b = jnp.broadcast_to(xs, (2, L, 4))           # time moves to axis 1
    c = lax.broadcast_in_dim(xs, (4, 2, L), (2, 0))
    return a.sum(1), b[1], c.sum(1).T
  check_scan(f, xs_of())


def test_broadcast_in_dim_of_scanned_vector():
  def f(v):
    return v[:, None] * jnp.ones((L, 5)), jnp.outer(v, jnp.arange(3.))
  check_scan(f, xs_of((L,)))


def test_expand_dims_and_squeeze():
  def f(xs):
    y = jnp.expand_dims(xs, (0, 2))   # [1, L, 1, 4]
    z = jnp.squeeze(y, (0, 2))
    w = lax.expand_dims(xs, (2,))[..., 0] + jnp.squeeze(xs[:, None], 1)
    return z * 2, w, jnp.squeeze(xs[:, :1], axis=-1)
  check_scan(f, xs_of())


def test_reshape_keeps_scanned_axis():
  def f(xs):                      # xs: [L, 6]
    a = xs.reshape(L, 2, 3)
    b = a.reshape(L, 6)
    c = xs.reshape(1, L, 3, 2, 1)
    d = xs.reshape(L, 6, 1).reshape(L, 3, 2)
    return a.sum(-1), b, c[0, ..., 0].max(-1), d[:, :, 1]
  check_scan(f, xs_of((L, 6)))


def test_reshape_scanned_axis_in_middle():
  def f(xs):                      # xs: [L, 2, 3]
    y = jnp.moveaxis(xs, 0, 1)    # [2, L, 3]
    y = y.reshape(2, L, 3, 1).reshape(2, L, 3)
    y = jnp.moveaxis(y, 1, 2).reshape(6, L)   # merges axes before time
    return y.T
  check_scan(f, xs_of((L, 2, 3)))


def test_transpose_moves_scanned_axis_and_back():
  def f(xs):                      # [L, 2, 3]
    y = jnp.swapaxes(xs, 0, 2)    # [3, 2, L]
    y = jnp.sin(y) * jnp.arange(3.)[:, None, None]
    y = jnp.transpose(y, (2, 0, 1))   # [L, 3, 2]
    y = y.T                       # [2, 3, L]
    return jnp.transpose(y, (2, 1, 0)) + xs.swapaxes(1, 2)
  check_scan(f, xs_of((L, 2, 3)))


def test_output_left_with_time_inside():
  def f(xs):
    return jnp.swapaxes(jnp.cumsum(xs.T, axis=1), 0, 1)
  check_scan(f, xs_of())


def test_rev_other_axes():
  check_scan(lambda xs: (xs[:, ::-1], lax.rev(xs, (1, 2))),
             xs_of((L, 3, 2)))


def test_concatenate_split_pad_slice_other_axes():
  def f(xs):                      # [L, 4]
    a = jnp.concatenate([xs, jnp.ones((L, 2)), xs * 2], axis=1)
    b, c, d = jnp.split(a, [3, 5], axis=1)
    e = jnp.pad(xs, ((0, 0), (2, 1)), constant_values=-1.)
    g = lax.pad(xs, 0., [(0, 0, 0), (1, -1, 1)])
    h = xs[:, 1:3] + xs[:, ::2] + lax.slice(xs, (0, 0), (L, 4), (1, 2))
    return a, b, c, d, e, g, h
  check_scan(f, xs_of())


def test_concatenate_with_constant_full_length():
  table = jnp.arange(L * 2, dtype=jnp.float32).reshape(L, 2)
  check_scan(lambda xs: jnp.concatenate([table, xs, table], axis=1),
             xs_of())


def test_stack_and_unstack():
  def f(ab):
    a, b = ab
    s = jnp.stack([a, b, a * b], axis=1)       # [L, 3, 4]
    t = jnp.stack([a, b], axis=-1)             # [L, 4, 2]
    u, v = lax.unstack(t, axis=2)              # [L, 4] each
    w = lax.unstack(s, axis=1)
    return s.sum(1) + t[..., 0], jnp.vstack([a.T, b.T]).T, u - v, w[2]
  check_scan(f, (xs_of(seed=1), xs_of(seed=2)))


def test_stack_with_constant_and_time_moved():
  table = jnp.arange(L * 4, dtype=jnp.float32).reshape(L, 4)

  def f(xs):
    s = jnp.stack([xs.T, table.T], axis=0)     # [2, 4, L]
    g = jax.grad(lambda y: (jnp.stack([y, y * y]) ** 2).sum())
    return s[1].T * s[0].T, jax.vmap(g)(xs)   # grad: unstack
  check_scan(f, xs_of())


def test_dynamic_slice_other_axes():
  def f(xs):                      # [L, 5]
    i = jnp.argmax(jnp.array([0., 2., 1.]))   # a known start
    a = lax.dynamic_slice_in_dim(xs, i, 3, axis=1)
    b = lax.dynamic_slice(xs, (0, 2), (L, 2))
    c = lax.dynamic_index_in_dim(xs, 4, axis=1)
    return a, b, c
  check_scan(f, xs_of((L, 5)))


def test_dynamic_slice_with_unscanned_argument_start():
  import numpy as np
  import scanagram
  xs = xs_of((L, 5))

  def f(i, xs):
    return lax.dynamic_slice_in_dim(xs, i, 2, axis=1) * 2
  fns = scanagram.to_step(f, jnp.int32(1), xs, in_axes=(None, 0))
  for i in (0, 2, 3):
    carry = fns.init(jnp.int32(i))
    for t in range(L):
      carry, y = fns.step(jnp.int32(i), carry, xs[t])
      np.testing.assert_allclose(y, f(jnp.int32(i), xs)[t])


def test_dynamic_update_slice_other_axes():
  def f(ab):
    xs, v = ab                    # [L, 5], [L, 2]
    a = lax.dynamic_update_slice(xs, v, (0, 1))
    b = lax.dynamic_update_slice_in_dim(xs, v * 3, 3, axis=1)
    c = lax.dynamic_update_slice(jnp.zeros((L, 5)), v, (0, 2))  # buffer
    d = lax.dynamic_update_slice(xs, jnp.ones((L, 2)), (0, 0))  # constant
    e = lax.dynamic_update_slice(xs, v, (0, 9))   # clamped start
    return a, b, c, d, e
  check_scan(f, (xs_of((L, 5)), xs_of((L, 2), seed=1)))


def test_dynamic_update_slice_time_moved():
  def f(ab):
    xs, v = ab
    y = lax.dynamic_update_slice(xs.T, v.T, (1, 0))   # [5, L] with [2, L]
    return y.T
  check_scan(f, (xs_of((L, 5)), xs_of((L, 2), seed=1)))


def test_dtypes_through_structure():
  def f(d):
    a = d["i"].reshape(L, 2, 2).transpose(0, 2, 1).reshape(L, 4)
    b = jnp.concatenate([d["b"], ~d["b"]], axis=1)
    c = jnp.pad(d["h"], ((0, 0), (1, 1)))
    return a, b, c
  check_scan(f, {"i": xs_of(dtype=jnp.int32), "b": xs_of(dtype=bool),
                 "h": xs_of(dtype=jnp.bfloat16)})


# -- refusals ---------------------------------------------------------------
def test_refused_reshape_merging_time():
  check_refused(lambda xs: xs.reshape(-1), xs_of(), "reshape",
                "merging the scanned axis")
  check_refused(lambda xs: xs.reshape(L // 2, 8), xs_of(), "reshape")
  check_refused(lambda xs: xs.reshape(2, L // 2, 4), xs_of(), "reshape")
  check_refused(lambda xs: xs.T.reshape(L * 4).reshape(4, L).T, xs_of(),
                "reshape")


def test_refused_x_plus_transpose():
  check_refused(lambda x: x + x.T, xs_of((4, 4)), "add")
  check_refused(lambda x: x @ x.T * 0 + x * x.T, xs_of((4, 4)))


def test_refused_unstack_time():
  check_refused(lambda xs: lax.unstack(xs, axis=0)[1] + xs, xs_of(),
                "unstack", "scanned axis 0")


def test_refused_rev_time():
  check_refused(lambda xs: xs[::-1], xs_of(), "rev", "reverses the scanned")
  check_refused(lambda xs: jnp.flip(xs.T, 1).T, xs_of(), "rev")


def test_refused_squeeze_time():
  check_refused(lambda xs: jnp.squeeze(xs[:1], 0), xs_of())


def test_refused_broadcast_of_time_from_size_one():
  # a scanned value of size 1 along time broadcast over the time axis
  check_refused(lambda xs: jnp.broadcast_to(xs[:1], (L, 4)) + xs, xs_of())


def test_refused_dynamic_slice_window_of_time():
  check_refused(lambda xs: lax.dynamic_slice_in_dim(xs, 1, 3, axis=0)
                .sum() + xs, xs_of(), "dynamic_slice")
  check_refused(lambda xs: lax.dynamic_update_slice(
      xs, jnp.zeros((2, 4)), (2, 0)), xs_of(), "dynamic_update_slice")


def test_tile_other_axes():
  def f(xs):
    return jnp.tile(xs, (1, 2)), jnp.tile(xs[:, None], (1, 3, 1)).sum(1)
  check_scan(f, xs_of())


def test_refused_tile_time():
  check_refused(lambda xs: jnp.tile(xs, (2, 1))[:L], xs_of(), "tile",
                "repeats the whole sequence")
