"""scan, while_loop, fori_loop and cond inside a causal function."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import scanagram
from conftest import check_refused, check_scan, random_like

L, D, H = 6, 3, 4
X = random_like(jnp.zeros((L, D)))


def lstm_params(seed=0):
  return random_like({"wx": jnp.zeros((D, 4 * H)), "wh": jnp.zeros((H, 4 * H)),
                      "b": jnp.zeros((4 * H,))}, seed)


def lstm(params, xs):
  """A hand-written LSTM: xs [T, D] -> hs [T, H]."""
  def cell(hc, x):
    h, c = hc
    gates = x @ params["wx"] + h @ params["wh"] + params["b"]
    i, f, g, o = jnp.split(gates, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h
  init = (jnp.zeros(H), jnp.zeros(H))
  return lax.scan(cell, init, xs)[1]


def test_lstm_and_its_carry():
  params = lstm_params()
  fun = lambda xs: lstm(params, xs)
  check_scan(fun, X, prefill_lengths=range(L + 1))
  _, init = scanagram.as_scan(fun, X)
  # (h, c) and the shared position counter, nothing else
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(init))
  assert shapes == [(), (H,), (H,)], init
  assert init["position"].shape == ()


def test_lstm_with_params_as_inputs_carry():
  fns = scanagram.to_step(lstm, lstm_params(), X, in_axes=(None, 0))
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(fns.carry_spec()))
  assert shapes == [(), (H,), (H,)]


def test_gru_like_scan():
  p = random_like({"wz": jnp.zeros((D + H, H)), "wr": jnp.zeros((D + H, H)),
                   "wn": jnp.zeros((D + H, H))}, 1)

  def gru(xs):
    def cell(h, x):
      hx = jnp.concatenate([h, x])
      z = jax.nn.sigmoid(hx @ p["wz"])
      r = jax.nn.sigmoid(hx @ p["wr"])
      n = jnp.tanh(jnp.concatenate([r * h, x]) @ p["wn"])
      h = (1 - z) * h + z * n
      return h, (h, z)
    return lax.scan(cell, jnp.zeros(H), xs)[1]
  check_scan(gru, X)


def test_scan_with_unscanned_full_length_xs():
  pos = random_like(jnp.zeros((L, D)), 2)  # a position table of length L

  def f(xs):
    return lax.scan(lambda c, xp: (c + xp[0] * xp[1], c), jnp.zeros(D),
                    (xs, pos))[1]
  check_scan(f, X)


def test_scan_over_a_shifted_input():
  def f(xs):
    shifted = jnp.concatenate([jnp.zeros((1, D)), xs[:-1]])
    return lax.scan(lambda c, x: (0.5 * c + x, c + x), jnp.zeros(D),
                    shifted)[1]
  check_scan(f, X, prefill_lengths=range(L + 1))

  def g(xs):  # one input shifted, the other not
    shifted = jnp.pad(xs, ((2, 0), (0, 0)))[:L]
    return lax.scan(lambda c, ab: (c + ab[0] * ab[1], c * ab[1]),
                    jnp.ones(D), (shifted, xs))[1]
  check_scan(g, X, prefill_lengths=range(L + 1))


def test_scan_with_the_time_axis_moved():
  def f(xs):  # inside fun time is axis 1 of [D, T], then axis 1 of [1, T, D]
    h = jnp.sin(xs.T)[None]                        # [1, D, T]
    h = jnp.swapaxes(h, 1, 2)                      # [1, T, D]
    ys = lax.scan(lambda c, x: (c + x, c * x), jnp.zeros((1, D)),
                  jnp.moveaxis(h, 1, 0))[1]        # [T, 1, D]
    return ys[:, 0].T                              # [D, T]
  fns = scanagram.to_step(f, X, out_axes=1)
  want = f(X)
  carry, out = fns.prefill(X[:3])
  np.testing.assert_allclose(out, want[:, :3], rtol=2e-5, atol=2e-5)
  for t in range(3, L):
    carry, y = fns.step(carry, X[t])
    np.testing.assert_allclose(y, want[:, t], rtol=2e-5, atol=2e-5)


def test_scan_over_layers_with_cumsum_and_conv():
  n_layers = 3
  ws = random_like(jnp.zeros((n_layers, 2, D, D)), 3)
  scales = random_like(jnp.zeros((n_layers, D)), 4)

  def f(xs):
    def layer(h, p):
      w, s = p
      h = jnp.cumsum(h, 0) * 0.3 + s
      h = lax.conv_general_dilated(h[None], w, (1,), [(1, 0)],
                                   dimension_numbers=("NWC", "WIO",
                                                      "NWC"))[0]
      return jnp.tanh(h), h.sum(-1)
    h, per_layer = lax.scan(layer, xs, (ws, scales))
    return h, jnp.moveaxis(per_layer, 0, 1)  # per_layer: [layers, T]
  check_scan(f, X, prefill_lengths=range(L + 1))
  # each layer keeps its own state, stacked along a leading axis
  _, init = scanagram.as_scan(f, X)
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(init))
  assert shapes == [(), (n_layers, 1, 1, D), (n_layers, 1, D)], shapes


def test_layer_stack_pattern():
  """``hk.layer_stack``'s shape: stacked params as xs, the sequence as carry,
  a per-layer RNN inside."""
  n_layers = 2
  params = jax.tree.map(lambda *a: jnp.stack(a),
                        *[lstm_params(s) for s in range(n_layers)])
  proj = random_like(jnp.zeros((n_layers, H, D)), 5)

  def f(xs):
    def layer(h, p):
      lp, w = p
      return h + lstm(lp, h) @ w, None
    return lax.scan(layer, xs, (params, proj))[0]
  check_scan(f, X, tol=1e-4)


def test_nested_scan():
  def f(xs):  # xs: [T, D]; inner scan over features, outer over time
    def outer(c, x):
      inner_c, ys = lax.scan(lambda a, v: (a * 0.5 + v, a + v), c, x)
      return inner_c, ys
    return lax.scan(outer, jnp.zeros(()), xs)[1]
  check_scan(f, X)

  def g(xs):  # a scan over layers whose body scans along time
    def layer(h, s):
      return lax.scan(lambda c, x: (c * s + x, c + x), jnp.zeros(D), h)[1], None
    return lax.scan(layer, xs, jnp.array([0.5, 0.9]))[0]
  check_scan(g, X, prefill_lengths=range(L + 1))
  _, init = scanagram.as_scan(g, X)
  shapes = sorted(leaf.shape for leaf in jax.tree.leaves(init))
  assert shapes == [(), (2, D)], shapes


def test_while_loop_with_counter_condition():
  def f(xs):
    def body(ic):
      i, y = ic
      return i + 1, jnp.sin(y) + 0.1 * i
    return lax.while_loop(lambda ic: ic[0] < 3, body, (0, xs))[1]
  check_scan(f, X)


def test_fori_loop():
  def f(xs):
    return lax.fori_loop(0, 3, lambda i, y: jnp.tanh(y) * 2 + i, xs)
  check_scan(f, X)

  def g(xs):  # dynamic bounds: lowered to while_loop
    n = jnp.asarray(3) + 0 * jnp.arange(1)[0]
    return lax.fori_loop(0, n, lambda i, y: y * 0.5 + 1., xs)
  check_scan(g, X)

  def h(xs):  # a fori_loop whose body keeps state (a cumsum): static bounds
    return lax.fori_loop(0, 2, lambda i, y: jnp.cumsum(y, 0) * 0.5, xs)
  check_scan(h, X)


def test_cond_with_unscanned_predicate():
  for flag in (True, False):
    def f(xs, flag=flag):
      return lax.cond(jnp.asarray(flag), lambda x: jnp.cumsum(x, 0),
                      lambda x: x * 2., xs)
    check_scan(f, X)

  def g(xs):
    return lax.switch(1, [jnp.sin, jnp.cos, jnp.tanh], xs)
  check_scan(g, X)


def test_cond_predicate_from_params_one_compiled_step():
  def f(flag, xs):
    return lax.cond(flag, lambda x: jnp.cumsum(x, 0), lambda x: -x, xs)
  fns = scanagram.to_step(f, jnp.asarray(True), X, in_axes=(None, 0))
  for flag in (True, False):
    want = f(jnp.asarray(flag), X)
    carry, out = fns.prefill(jnp.asarray(flag), X[:2])
    np.testing.assert_allclose(out, want[:2], rtol=2e-5, atol=2e-5)
    for t in range(2, L):
      carry, y = fns.step(jnp.asarray(flag), carry, X[t])
      np.testing.assert_allclose(y, want[t], rtol=2e-5, atol=2e-5)


def test_reverse_scan_refused():
  check_refused(lambda xs: lax.scan(lambda c, x: (c + x, c), jnp.zeros(D), xs,
                                    reverse=True)[1], X, "scan", "reverse")


def test_final_carry_refused():
  def f(xs):
    final, ys = lax.scan(lambda c, x: (c + x, c), jnp.zeros(D), xs)
    return ys + final
  check_refused(f, X, "final carry")


def test_while_condition_on_the_sequence_refused():
  # a loop condition is a scalar: to depend on the sequence it must reduce
  # over the scanned axis or pick one element, and that is where it is refused
  def f(xs):
    return lax.while_loop(lambda y: jnp.all(y < 10.), lambda y: y * 2. + 1.,
                          xs)
  check_refused(f, X, "reduce_and", "over the scanned axis 0")

  def g(xs):
    return lax.while_loop(lambda c: c[0] < c[1][-1, 0],
                          lambda c: (c[0] + 1., c[1] * 2.), (0., xs))[1]
  check_refused(g, X, "slice", "a future element")


def test_cond_predicate_on_the_sequence_refused():
  def f(xs):  # the first element chooses the branch for every position
    return lax.cond(xs[0, 0] > 0, lambda x: x, lambda x: -x, xs)
  check_refused(f, X, "squeeze", "squeezes away the scanned axis")

  def g(xs):  # the last element chooses the branch for every position
    return lax.cond(xs[-1, 0] > 0, lambda x: x, lambda x: -x, xs)
  check_refused(g, X, "slice", "a future element")


def test_cond_inside_an_rnn_is_per_position():
  def f(xs):
    return lax.scan(lambda c, x: (c + x, lax.cond(x[0] > 0, jnp.sin, jnp.cos,
                                                  x + c)), jnp.zeros(D), xs)[1]
  check_scan(f, X)


def test_carry_that_starts_unscanned_and_becomes_scanned():
  # the initial carry is full-length zeros; the sequence joins it in the body
  def layers(xs):
    return lax.scan(lambda h, s: (h * 0.5 + jnp.cumsum(xs * s, 0), None),
                    jnp.zeros((L, D)), jnp.arange(1., 3.))[0]
  check_scan(layers, X, prefill_lengths=range(L + 1))

  def loop(xs):
    return lax.while_loop(lambda ih: ih[0] < 2,
                          lambda ih: (ih[0] + 1, ih[1] * 0.5 + xs),
                          (0, jnp.zeros((L, D))))[1]
  check_scan(loop, X, prefill_lengths=range(L + 1))

  def fori(xs):
    return lax.fori_loop(0, 3, lambda i, h: h * 0.5 + jnp.cumsum(xs, 0),
                         jnp.zeros((L, D)))
  check_scan(fori, X, prefill_lengths=range(L + 1))


def test_scan_along_time_closing_over_the_sequence_refused():
  check_refused(lambda xs: lax.scan(lambda c, x: (c + x + xs[0], c),
                                    jnp.zeros(D), xs)[1], X,
                "scan", "a const depends on the whole sequence")


def test_while_with_a_stateful_body_refused():
  check_refused(lambda xs: lax.while_loop(
      lambda ih: ih[0] < 2, lambda ih: (ih[0] + 1, jnp.cumsum(ih[1], 0)),
      (0, xs))[1], X, "while", "keeps state")
