"""Elementwise primitives: every kind, several dtypes, unscanned full-length
operands (position tables, masks) indexed at the current position."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import check_refused, check_scan, random_like

L, D = 6, 3


def xs_of(dtype=jnp.float32, shape=(L, D), seed=0):
  return random_like(jnp.zeros(shape, dtype), seed)


UNARY_FLOAT = {
    "abs": jnp.abs, "neg": jnp.negative, "sign": jnp.sign,
    "floor": jnp.floor, "ceil": jnp.ceil, "round": jnp.round,
    "exp": jnp.exp, "exp2": jnp.exp2, "expm1": jnp.expm1,
    "log1p_abs": lambda x: jnp.log1p(jnp.abs(x)),
    "log_abs": lambda x: jnp.log(jnp.abs(x) + 1),
    "sqrt_abs": lambda x: jnp.sqrt(jnp.abs(x)),
    "rsqrt": lambda x: lax.rsqrt(jnp.abs(x) + 1),
    "cbrt": jnp.cbrt, "square": jnp.square,
    "sin": jnp.sin, "cos": jnp.cos, "tan": lambda x: jnp.tan(x / 4),
    "asin": lambda x: jnp.arcsin(jnp.tanh(x)),
    "acos": lambda x: jnp.arccos(jnp.tanh(x)),
    "atan": jnp.arctan, "sinh": jnp.sinh, "cosh": jnp.cosh,
    "tanh": jnp.tanh, "asinh": jnp.arcsinh,
    "acosh": lambda x: jnp.arccosh(jnp.abs(x) + 1),
    "atanh": lambda x: jnp.arctanh(jnp.tanh(x) * 0.9),
    "logistic": jax.nn.sigmoid, "erf": lax.erf, "erfc": lax.erfc,
    "erf_inv": lambda x: lax.erf_inv(jnp.tanh(x) * 0.9),
    "lgamma": lambda x: lax.lgamma(jnp.abs(x) + 0.5),
    "digamma": lambda x: lax.digamma(jnp.abs(x) + 0.5),
    "bessel_i0e": lax.bessel_i0e, "bessel_i1e": lax.bessel_i1e,
    "is_finite": lambda x: jnp.isfinite(1 / x),
    "integer_pow": lambda x: x ** 3,
    "integer_pow_neg": lambda x: lax.integer_pow(jnp.abs(x) + 1, -2),
    "reduce_precision": lambda x: lax.reduce_precision(x, 5, 10),
    "copy": lambda x: lax.copy_p.bind(x),
    "stop_gradient": lax.stop_gradient,
    "gelu": jax.nn.gelu, "softplus": jax.nn.softplus,
    "convert_bf16": lambda x: x.astype(jnp.bfloat16),
    "convert_int": lambda x: (x * 3).astype(jnp.int32),
    "convert_bool": lambda x: x.astype(bool),
    "nextafter": lambda x: jnp.nextafter(x, jnp.float32(0)),
    "real_imag": lambda x: jnp.real(x * (1 + 2j)) + jnp.imag(
        lax.complex(x, x * 2)),
    "conj_abs": lambda x: jnp.abs(jnp.conj(x + 1j)),
}


@pytest.mark.parametrize("name", sorted(UNARY_FLOAT))
def test_unary_float(name):
  check_scan(UNARY_FLOAT[name], xs_of(), prefill_lengths=[0, 2, L])


BINARY_FLOAT = {
    "add": jnp.add, "sub": jnp.subtract, "mul": jnp.multiply,
    "div": lambda a, b: a / (jnp.abs(b) + 1),
    "rem": lambda a, b: lax.rem(a, jnp.abs(b) + 1),
    "pow": lambda a, b: jnp.abs(a) ** b, "max": jnp.maximum,
    "min": jnp.minimum, "atan2": jnp.arctan2,
    "eq": lambda a, b: a == jnp.round(b), "ne": lambda a, b: a != b,
    "lt": jnp.less, "le": jnp.less_equal, "gt": jnp.greater,
    "ge": jnp.greater_equal,
    "igamma": lambda a, b: lax.igamma(jnp.abs(a) + 1, jnp.abs(b) + 1),
    "igammac": lambda a, b: lax.igammac(jnp.abs(a) + 1, jnp.abs(b) + 1),
    "zeta": lambda a, b: lax.zeta(jnp.abs(a) + 2, jnp.abs(b) + 1),
    "polygamma": lambda a, b: lax.polygamma(jnp.ones_like(a),
                                            jnp.abs(b) + 1),
    "logaddexp": jnp.logaddexp, "hypot": jnp.hypot,
    "where": lambda a, b: jnp.where(a > b, a, b * 2),
}


@pytest.mark.parametrize("name", sorted(BINARY_FLOAT))
def test_binary_float(name):
  f = BINARY_FLOAT[name]
  check_scan(lambda ab: f(ab[0], ab[1]), (xs_of(seed=1), xs_of(seed=2)),
             prefill_lengths=[0, 3, L], tol=1e-4)


def test_betainc_and_clamp():
  def f(abc):
    a, b, c = abc
    y = jax.scipy.special.betainc(jnp.abs(a) + 1, jnp.abs(b) + 1,
                                        jax.nn.sigmoid(c))
    return y, lax.clamp(a, b, c), lax.clamp(-0.5, a, 0.5), jnp.clip(a, b)
  check_scan(f, (xs_of(seed=1), xs_of(seed=2), xs_of(seed=3)), tol=1e-4)


INT_OPS = {
    "and": lambda a, b: a & b, "or": lambda a, b: a | b,
    "xor": lambda a, b: a ^ b, "not": lambda a, b: ~a,
    "shift_left": lambda a, b: a << b,
    "shift_right_arithmetic": lambda a, b: (a - 2) >> b,
    "shift_right_logical": lambda a, b: lax.shift_right_logical(a - 2, b),
    "population_count": lambda a, b: lax.population_count(a),
    "clz": lambda a, b: lax.clz(a),
    "add_mul": lambda a, b: a * b + a - b, "neg": lambda a, b: -a,
    "floordiv": lambda a, b: a // (b + 1), "rem": lambda a, b: a % (b + 1),
    "max_min": lambda a, b: jnp.maximum(a, b) - jnp.minimum(a, b),
    "abs_sign": lambda a, b: jnp.abs(a - 2) * jnp.sign(b - 2),
    "cmp": lambda a, b: (a < b) | (a == b),
    "integer_pow": lambda a, b: a ** 2,
    "to_float": lambda a, b: a.astype(jnp.float32) / 2,
    "where": lambda a, b: jnp.where(a > 2, a, b),
}


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.int8])
def test_integer(dtype):
  check_scan(lambda ab: {n: f(ab[0], ab[1]) for n, f in INT_OPS.items()},
             (xs_of(dtype, seed=1), xs_of(dtype, seed=2)))


def test_bool_ops():
  def f(ab):
    a, b = ab
    return (a & b, a | b, a ^ b, ~a, a == b, a != b,
            jnp.where(a, 1.0, 2.0), a.astype(jnp.int32) + b)
  check_scan(f, (xs_of(bool, seed=1), xs_of(bool, seed=2)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_float_dtypes(dtype):
  def f(xs):
    y = jnp.tanh(xs) * 2 + jax.nn.sigmoid(xs) - xs ** 2
    y = jnp.where(y > 0, y, lax.erf(y)) / (1 + jnp.abs(xs))
    return y, y.astype(jnp.float32), lax.reduce_precision(y, 4, 3)
  # XLA may keep fused half-precision intermediates in float32 in one mode
  # and not the other: compare float32 results at half precision too
  check_scan(f, xs_of(dtype), tol=None if dtype == jnp.float32 else 2e-2)


def test_mixed_dtype_pipeline():
  def f(xs):
    i = (xs * 4).astype(jnp.int32)
    b = (i & 1).astype(bool)
    h = xs.astype(jnp.bfloat16) * 3
    return jnp.where(b, h.astype(jnp.float32), -xs) + (i >> 1)
  check_scan(f, xs_of(), tol=2e-2)  # bfloat16 intermediates


def test_scalar_and_broadcast_operands():
  def f(xs):
    return (xs * 2.5 + 1, 3 - xs, jnp.maximum(xs, 0.), xs / jnp.float32(7),
            xs + jnp.ones((1, D)), xs * jnp.arange(D, dtype=jnp.float32))
  check_scan(f, xs_of())


def test_position_table():
  # a learned position table [L, D] added at the current position
  table = jax.random.normal(jax.random.key(3), (L, D))
  check_scan(lambda xs: xs + table, xs_of(), prefill_lengths=range(L + 1))
  check_scan(lambda xs: table * xs - table, xs_of())


def test_position_table_as_parameter():
  # the table is an argument of fun (unscanned), not a closed-over constant
  import scanagram
  table = jax.random.normal(jax.random.key(3), (L, D))
  xs = xs_of()

  def f(table, xs):
    return jnp.sin(xs) * table + jnp.arange(L, dtype=jnp.float32)[:, None]
  fns = scanagram.to_step(f, table, xs, in_axes=(None, 0))
  want = f(table, xs)
  for p in (0, 2, L):
    carry, out = fns.prefill(table, xs[:p])
    np.testing.assert_allclose(out, want[:p], rtol=1e-5, atol=1e-5)
    for t in range(p, L):
      carry, y = fns.step(table, carry, xs[t])
      np.testing.assert_allclose(y, want[t], rtol=1e-5, atol=1e-5)
  # a different table with the same compiled step
  table2 = table * 3
  carry = fns.init(table2)
  for t in range(L):
    carry, y = fns.step(table2, carry, xs[t])
    np.testing.assert_allclose(y, f(table2, xs)[t], rtol=1e-5, atol=1e-5)


def test_constant_mask_and_iota():
  mask = jnp.array([1, 0, 1, 1, 0, 1], bool)[:, None]
  def f(xs):
    pos = lax.broadcasted_iota(jnp.int32, (L, D), 0)
    y = jnp.where(mask, xs, 0.) + pos
    return jnp.where(pos % 2 == 0, y, -y), lax.select(
        jnp.broadcast_to(mask, (L, D)), xs, xs * 2)
  check_scan(f, xs_of(), prefill_lengths=range(L + 1))


def test_position_table_along_moved_axis():
  table = jax.random.normal(jax.random.key(4), (D, L))

  def f(xs):
    return (xs.T * table + table).T   # time along axis 1 inside
  check_scan(f, xs_of())


def test_select_n_many_cases():
  def f(xs):
    which = jnp.clip((xs[:, :1] * 2).astype(jnp.int32) + 1, 0, 2)
    which = jnp.broadcast_to(which, (L, D))
    return lax.select_n(which, xs, -xs, xs * 10), lax.select_n(
        xs > 0, jnp.zeros((L, D)), jnp.arange(L * D, dtype=jnp.float32)
        .reshape(L, D))
  check_scan(f, xs_of())


def test_several_scanned_inputs_pytree():
  def f(d):
    return {"s": d["a"] * d["b"][:, None] + jnp.cos(d["a"]),
            "c": jnp.where(d["m"], d["b"], 0.)}
  check_scan(f, {"a": xs_of(), "b": xs_of(shape=(L,), seed=1),
                 "m": xs_of(bool, shape=(L,), seed=2)})


def test_stop_gradient_and_grad_inside():
  def f(xs):
    g = jax.grad(lambda y: jnp.sum(jnp.sin(y) * lax.stop_gradient(y)))
    return jax.vmap(g)(xs)
  check_scan(f, xs_of())


def test_refused_different_scanned_axes():
  x = xs_of(shape=(4, 4))
  check_refused(lambda x: x + x.T, x, "add", "different axes")
  check_refused(lambda x: jnp.where(x > 0, x, x.T), x, "select_n",
                "different axes")


def test_refused_first_element_broadcast_over_time():
  # xs[:1] + xs: lax broadcasts the size-1 axis; the step would add x_t
  # to itself instead of x_0
  check_refused(lambda xs: xs[:1] + xs, xs_of(), "add",
                "one element along the scanned axis 0")
  check_refused(lambda xs: lax.mul(jnp.cumsum(xs, 0)[:1], xs), xs_of(),
                "mul")
  check_refused(lambda xs: jnp.where(xs[:1] > 0, xs, 0.), xs_of())


def test_size_one_unscanned_operand_broadcasts():
  bias = jnp.arange(D, dtype=jnp.float32)[None]   # [1, D]
  check_scan(lambda xs: lax.add(xs, bias) * lax.max(bias, xs), xs_of())


def test_bitcast_convert_type():
  def f(xs):
    b = lax.bitcast_convert_type(xs, jnp.uint8)            # [L, D, 4]
    w = lax.bitcast_convert_type(xs[:, 0], jnp.uint16)     # [L, 2]
    back = lax.bitcast_convert_type(b, jnp.float32)        # [L, D]
    return (b.astype(jnp.int32).sum(-1), w, back,
            lax.bitcast_convert_type(xs, jnp.int32))
  check_scan(f, xs_of())


def test_refused_bitcast_packing_time():
  # uint8 bytes along the scanned axis packed into one float32
  check_refused(lambda b: lax.bitcast_convert_type(b.T, jnp.float32),
                xs_of(jnp.uint8, shape=(4, 3)), "bitcast_convert_type",
                "bytes")


def test_total_order_comparisons():
  from jax.extend.core import primitives as P
  def f(ab):
    a, b = ab
    a = jnp.where(a > 1, jnp.nan, a)
    return (P.eq_to_p.bind(a, b), P.le_to_p.bind(a, b),
            P.lt_to_p.bind(b, a))
  check_scan(f, (xs_of(seed=1), xs_of(seed=2)))


def test_sort_with_nans_uses_total_order():
  check_scan(lambda x: jnp.sort(jnp.where(x > 1, jnp.nan, x), axis=1),
             xs_of())
