"""Shifts along the scanned axis (pad, concatenate, slice, split): delayed
sequences whose pending elements join the carry; refusals for shifts that
need future elements."""
import jax
import jax.numpy as jnp
from jax import lax

from conftest import check_refused, check_scan, random_like

L = 7
ALL_P = range(L + 1)


def xs_of(shape=(L, 3), dtype=jnp.float32, seed=0):
  return random_like(jnp.zeros(shape, dtype), seed)


def shift(xs, k, axis=0, value=0):
  """xs delayed by k along axis, the first k elements ``value``."""
  widths = [(0, 0)] * xs.ndim
  widths[axis] = (k, 0)
  padded = jnp.pad(xs, widths, constant_values=value)
  return lax.slice_in_dim(padded, 0, xs.shape[axis], axis=axis)


def test_pad_front_slice_tail():
  check_scan(lambda xs: jnp.pad(xs, ((1, 0), (0, 0)))[:-1], xs_of(),
             prefill_lengths=ALL_P)


def test_concatenate_zeros_and_head():
  check_scan(lambda xs: jnp.concatenate([jnp.zeros((1, 3)), xs[:-1]]),
             xs_of(), prefill_lengths=ALL_P)


def test_shift_by_two_and_three():
  def f(xs):
    a = shift(xs, 2)
    b = jnp.concatenate([jnp.full((3, 3), -1.), xs[:-3]])
    return a, b, a * b + xs
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_shift_by_whole_length_and_more():
  def f(xs):
    a = shift(xs, L)           # all padding
    b = jnp.pad(xs, ((L + 2, 0), (0, 0)))[:L]
    return a + b + xs
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_shift_with_nonzero_constants():
  def f(xs):
    start = jnp.arange(6.).reshape(2, 3)
    return (jnp.concatenate([start, xs[:-2]]),
            jnp.pad(xs, ((1, 0), (0, 0)), constant_values=5.)[:L])
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_shift_then_cumsum():
  check_scan(lambda xs: jnp.cumsum(shift(xs, 1), axis=0), xs_of(),
             prefill_lengths=ALL_P)
  check_scan(lambda xs: jnp.cumsum(shift(xs, 3), axis=0) - xs, xs_of())


def test_shift_of_a_shift():
  def f(xs):
    y = shift(jnp.sin(xs), 1)
    z = shift(y * 2, 2)
    return shift(z + y, 1) - xs
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_shift_mixed_with_unshifted_and_position_table():
  table = jax.random.normal(jax.random.key(1), (L, 3))

  def f(xs):
    y = shift(xs, 2)
    return y + table, y * xs + shift(xs, 1), jnp.where(shift(xs, 1) > 0,
                                                       table, y)
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_truncated_then_constant_suffix():
  c = jnp.arange(6.).reshape(2, 3) + 10

  def f(xs):
    return jnp.concatenate([xs[:-2], c])
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_shifted_truncated_then_constant_suffix():
  def f(xs):
    y = jnp.concatenate([jnp.zeros((1, 3)), xs[:-3], 5 * jnp.ones((2, 3))])
    z = jnp.pad(xs[:-3], ((1, 2), (0, 0)), constant_values=-2.)
    return y, z, y * z
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_pad_back_of_truncated():
  check_scan(lambda xs: jnp.pad(xs[:-2], ((0, 2), (0, 0)),
                                constant_values=3.), xs_of(),
             prefill_lengths=ALL_P)


def test_pad_both_ends_then_slice():
  def f(xs):
    p = jnp.pad(xs, ((2, 3), (0, 0)), constant_values=1.)   # [L + 5]
    return p[:L], p[1:L + 1], p[2:L + 2]
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_slice_of_a_shifted_value():
  def f(xs):
    y = shift(xs, 2)
    z = y[1:]                      # one ahead, length L - 1
    return jnp.concatenate([z, jnp.ones((1, 3))]), lax.pad(
        xs, 0., [(-0, 0, 0), (1, 0, 0)])
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_negative_padding_of_a_shifted_value():
  def f(xs):
    y = jnp.pad(xs, ((3, 0), (0, 0)))                 # ahead 3
    return lax.pad(y, 0., [(-2, -1, 0), (0, 0, 0)])   # ahead 1, length L
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_negative_front_positive_back_padding_of_a_shifted_value():
  def f(xs):
    y = jnp.pad(xs, ((2, 0), (0, 0)), constant_values=4.)   # ahead 2
    return lax.pad(y[:L], -3., [(-1, 1, 0), (0, 0, 0)])     # ahead 1
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_mixed_truncated_values_with_different_delays():
  def f(xs):
    y = xs[:-2] + shift(xs, 1)[:-2]          # length L - 2, two delays
    return jnp.concatenate([y, jnp.zeros((2, 3))])
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_split_of_shifted_value():
  def f(xs):
    y = jnp.pad(xs, ((2, 0), (0, 0)))         # [L + 2], ahead 2
    head, rest = jnp.split(y, [1])            # rest: ahead 1, length L + 1
    a, b = jnp.split(y, [2])                  # b == xs
    return rest[:L] * 2, b
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


def test_split_other_axis():
  def f(xs):
    a, b, c = jnp.split(xs, 3, axis=1)
    return jnp.concatenate([c, a * b], axis=1)
  check_scan(f, xs_of())


def test_shift_along_moved_axis():
  def f(xs):                                   # [L, 2, 3]
    y = jnp.transpose(xs, (1, 2, 0))           # [2, 3, L]
    y = shift(y, 2, axis=2) + shift(y, 1, axis=2) * 3
    y = jnp.concatenate([jnp.zeros((2, 3, 1)), y[..., :-1]], axis=2)
    return jnp.transpose(y, (2, 0, 1))
  check_scan(f, xs_of((L, 2, 3)), prefill_lengths=ALL_P)


def test_shift_dtypes():
  def f(d):
    return (shift(d["i"], 2, value=7), shift(d["b"], 1, value=True),
            shift(d["h"], 3))
  check_scan(f, {"i": xs_of(dtype=jnp.int32), "b": xs_of(dtype=bool),
                 "h": xs_of(dtype=jnp.bfloat16)}, prefill_lengths=ALL_P)


def test_outputs_with_different_delays_and_pytree():
  def f(d):
    return {"now": d["a"], "prev": shift(d["a"], 1),
            "prev2": shift(d["b"], 2)}
  check_scan(f, {"a": xs_of(), "b": xs_of((L,), seed=1)},
             prefill_lengths=ALL_P)


def test_shift_through_scan_and_conv_style_taps():
  def f(xs):                               # a 3-tap causal filter by hand
    return xs * 0.5 + shift(xs, 1) * 0.3 + shift(xs, 2) * 0.2
  check_scan(f, xs_of(), prefill_lengths=ALL_P)


# -- refusals ---------------------------------------------------------------
def test_refused_future_slice():
  check_refused(lambda xs: jnp.concatenate([xs[1:], xs[:1]]), xs_of(),
                "slice", "future element")
  check_refused(lambda xs: jnp.pad(xs[1:], ((0, 1), (0, 0))), xs_of(),
                "slice", "future element")


def test_refused_roll():
  check_refused(lambda xs: jnp.roll(xs, 1, axis=0), xs_of(), "slice")
  check_refused(lambda xs: jnp.roll(xs, -1, axis=0), xs_of(), "slice")


def test_refused_left_shift_by_padding():
  check_refused(lambda xs: lax.pad(xs, 0., [(-1, 1, 0), (0, 0, 0)]),
                xs_of(), "pad", "future element")
  check_refused(lambda xs: lax.pad(shift(xs, 1), 0., [(-2, 2, 0),
                                                      (0, 0, 0)]),
                xs_of(), "pad", "future element")


def test_refused_strided_and_interior():
  check_refused(lambda xs: jnp.repeat(xs[::2], 2, axis=0)[:L], xs_of(),
                "slice")
  check_refused(lambda xs: lax.pad(xs, 0., [(0, -L + 1, 1), (0, 0, 0)])
                [:L], xs_of(), "pad", "between the elements")


def test_refused_two_sequences_joined_along_time():
  check_refused(lambda xs: jnp.concatenate([xs[:3], xs[:4]]), xs_of(),
                "concatenate", "future elements")


def test_refused_split_piece_of_future():
  check_refused(lambda xs: jnp.concatenate(jnp.split(xs, [2])[::-1]),
                xs_of(), "split", "future element")


def test_refused_padding_value_from_input():
  check_refused(lambda xs: lax.pad(xs, xs[0, 0], [(1, -1, 0), (0, 0, 0)]),
                xs_of())


def test_refused_slice_too_far_after_shift():
  check_refused(lambda xs: jnp.pad(shift(xs, 1)[2:], ((0, 2), (0, 0))),
                xs_of(), "slice", "future element")
