"""The public API: parameters as inputs, axes, pytrees, transformations of the
step, input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import scanagram
from conftest import assert_trees_close, check_refused, check_scan, random_like

L, D = 6, 3
X = random_like(jnp.zeros((L, D)))
PARAMS = random_like({"w": jnp.zeros((D, D)), "b": jnp.zeros(D)}, 1)


def model(params, xs):
  """xs: [T, D] -> [T, D]: a projection, a causal conv and a cumsum."""
  h = jnp.tanh(xs @ params["w"] + params["b"])
  h = h + jnp.concatenate([jnp.zeros((1, D)), h[:-1]]) * params["b"]
  return jnp.cumsum(h, 0)


def run_steps(fns, params, xs, carry=None):
  carry = fns.init(params) if carry is None else carry
  ys = []
  for t in range(xs.shape[0]):
    carry, y = fns.step(params, carry, xs[t])
    ys.append(y)
  return carry, jnp.stack(ys)


def test_params_as_inputs_init_prefill_step():
  fns = scanagram.to_step(model, PARAMS, X, in_axes=(None, 0))
  assert fns.length == L
  for seed in (2, 3):  # new parameter values, same functions
    params = random_like(PARAMS, seed)
    want = model(params, X)
    assert_trees_close(run_steps(fns, params, X)[1], want)
    for p in (0, 2, L):
      carry, out = fns.prefill(params, X[:p])
      assert_trees_close(out, want[:p])
      if p < L:
        assert_trees_close(run_steps(fns, params, X[p:], carry)[1], want[p:])


def test_one_compiled_step_serves_new_params():
  traces = []

  def counted(params, xs):
    traces.append(1)
    return model(params, xs)
  fns = scanagram.to_step(counted, PARAMS, X, in_axes=(None, 0))
  assert len(traces) == 1
  step = jax.jit(fns.step)
  carry = fns.init(PARAMS)
  n_after_init = len(traces)
  assert n_after_init == 1
  for seed in (4, 5, 6):
    params = random_like(PARAMS, seed)
    carry2, y = step(params, carry, X[0])
    assert_trees_close(y, model(params, X)[0])
    fns.init(params)
    fns.prefill(params, X[:2])
  assert len(traces) == 1  # fun is traced once, at conversion
  assert step._cache_size() == 1  # one compilation for every param value


def test_scanned_axis_1_batch_major():
  def batch_major(params, xs):  # xs: [B, T, D]
    return jax.vmap(model, (None, 0))(params, xs)
  xs = random_like(jnp.zeros((2, L, D)), 7)
  fns = scanagram.to_step(batch_major, PARAMS, xs, in_axes=(None, 1),
                          out_axes=1)
  want = batch_major(PARAMS, xs)
  carry, out = fns.prefill(PARAMS, xs[:, :3])
  assert out.shape == (2, 3, D)
  assert_trees_close(out, want[:, :3])
  for t in range(3, L):
    carry, y = fns.step(PARAMS, carry, xs[:, t])
    assert_trees_close(y, want[:, t])


def test_pytrees_of_inputs_and_outputs():
  def f(params, xs):
    a = model(params, xs["a"])
    b, c = xs["bc"]
    return {"sum": a + (b * c[:, None]).sum(1, keepdims=True), "parts": (jnp.cumsum(b, 0), c.astype(jnp.int32))}
  xs = random_like({"a": jnp.zeros((L, D)),
                    "bc": (jnp.zeros((L, 2)), jnp.zeros((L,), jnp.int32))}, 8)
  fns = scanagram.to_step(f, PARAMS, xs, in_axes=(None, 0))
  want = f(PARAMS, xs)
  carry, out = fns.prefill(PARAMS, jax.tree.map(lambda x: x[:2], xs))
  assert_trees_close(out, jax.tree.map(lambda y: y[:2], want))
  for t in range(2, L):
    carry, y = fns.step(PARAMS, carry, jax.tree.map(lambda x: x[t], xs))
    assert jax.tree.structure(y) == jax.tree.structure(want)
    assert_trees_close(y, jax.tree.map(lambda w: w[t], want))


def test_as_scan_with_pytrees():
  xs = random_like((jnp.zeros((L, D)), {"k": jnp.zeros((L, 1, 2))}), 9)
  f = lambda xs: {"y": jnp.cumsum(xs[0], 0), "z": [xs[1]["k"] * 2]}
  step, init = scanagram.as_scan(f, xs)
  assert_trees_close(lax.scan(step, init, xs)[1], f(xs))


def test_step_under_jit_and_vmap():
  fns = scanagram.to_step(model, PARAMS, X, in_axes=(None, 0))
  want = model(PARAMS, X)
  carry = fns.init(PARAMS)
  step = jax.jit(fns.step)
  ys = []
  for t in range(L):
    carry, y = step(PARAMS, carry, X[t])
    ys.append(y)
  assert_trees_close(jnp.stack(ys), want)

  batch = random_like(jnp.zeros((3, L, D)), 10)
  carries = jax.vmap(lambda _: fns.init(PARAMS))(jnp.arange(3))
  vstep = jax.vmap(fns.step, in_axes=(None, 0, 0))
  ys = []
  for t in range(L):
    carries, y = vstep(PARAMS, carries, batch[:, t])
    ys.append(y)
  assert_trees_close(jnp.stack(ys, 1), jax.vmap(model, (None, 0))(PARAMS,
                                                                  batch))


def test_grad_of_scanned_step_equals_grad_of_fun():
  fns = scanagram.to_step(model, PARAMS, X, in_axes=(None, 0))

  def via_step(params, xs):
    def step(carry, x):
      return fns.step(params, carry, x)
    return (lax.scan(step, fns.init(params), xs)[1] ** 2).sum()

  def via_fun(params, xs):
    return (model(params, xs) ** 2).sum()
  got = jax.grad(via_step, argnums=(0, 1))(PARAMS, X)
  want = jax.grad(via_fun, argnums=(0, 1))(PARAMS, X)
  assert_trees_close(got, want, tol=1e-4)
  # and through prefill then steps
  def via_prefill(params, xs):
    carry, out = fns.prefill(params, xs[:3])
    rest = lax.scan(lambda c, x: fns.step(params, c, x), carry, xs[3:])[1]
    return (jnp.concatenate([out, rest]) ** 2).sum()
  assert_trees_close(jax.grad(via_prefill)(PARAMS, X), want[0], tol=1e-4)


# -- bad inputs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fns():
  return scanagram.to_step(model, PARAMS, X, in_axes=(None, 0))


def test_wrong_carry_structure(fns):
  carry = fns.init(PARAMS)
  bad = dict(carry)
  bad.pop("position")
  with pytest.raises(TypeError, match="carry has structure"):
    fns.step(PARAMS, bad, X[0])
  with pytest.raises(TypeError, match="carry"):
    fns.step(PARAMS, [carry], X[0])


def test_wrong_carry_leaf_shape_and_dtype(fns):
  carry = fns.init(PARAMS)
  leaves, tree = jax.tree.flatten(carry)
  paths = [jax.tree_util.keystr(p)
           for p, _ in jax.tree_util.tree_flatten_with_path(carry)[0]]
  i = next(j for j, x in enumerate(leaves) if x.ndim > 0)
  bad = list(leaves)
  bad[i] = jnp.zeros(leaves[i].shape + (1,), leaves[i].dtype)
  with pytest.raises(ValueError) as info:
    fns.step(PARAMS, jax.tree.unflatten(tree, bad), X[0])
  message = str(info.value)
  assert paths[i] in message and str(leaves[i].shape) in message, message
  assert str(leaves[i].shape + (1,)) in message, message
  bad[i] = leaves[i].astype(jnp.int32)
  with pytest.raises(TypeError) as info:
    fns.step(PARAMS, jax.tree.unflatten(tree, bad), X[0])
  message = str(info.value)
  assert paths[i] in message and "float32" in message and "int32" in message


def test_wrong_x_shape_and_dtype(fns):
  carry = fns.init(PARAMS)
  with pytest.raises(ValueError) as info:
    fns.step(PARAMS, carry, X[:2])
  assert "(3,)" in str(info.value) and "(2, 3)" in str(info.value)
  with pytest.raises(TypeError) as info:
    fns.step(PARAMS, carry, X[0].astype(jnp.int32))
  assert "float32" in str(info.value) and "int32" in str(info.value)
  with pytest.raises(ValueError) as info:  # params are checked too
    fns.step({"w": jnp.zeros((2, 2)), "b": jnp.zeros(D)}, carry, X[0])
  assert "['w']" in str(info.value), info.value
  with pytest.raises(TypeError):
    fns.step(PARAMS, X[0])  # carry forgotten


def test_prompt_longer_than_l_refused(fns):
  long = jnp.zeros((L + 1, D))
  with pytest.raises(ValueError, match=f"more than L={L}"):
    fns.prefill(PARAMS, long)
  with pytest.raises(ValueError, match=f"more than L={L}"):
    scanagram.as_scan_with_prefill(lambda x: jnp.cumsum(x, 0), X, long)


def test_output_independent_of_input_without_time_axis_refused():
  with pytest.raises(scanagram.ScanConversionError,
                     match="does not depend on the scanned input"):
    scanagram.as_scan(lambda x: (x, jnp.ones(4)), X)
  # an unscanned output with a length-L axis is indexed per position
  table = jnp.arange(L * 2.).reshape(L, 2)
  step, init = scanagram.as_scan(lambda x: (x, table), X)
  assert_trees_close(lax.scan(step, init, X)[1], (X, table))


def test_output_running_along_another_axis_refused():
  # x.T is causal, but its time axis is 1: moving it to 0 silently would hand
  # the user a transposed result, so the output axis must be said, not guessed
  x = X[:D]  # square, so a wrongly moved axis would not change the shape
  with pytest.raises(scanagram.ScanConversionError,
                     match="runs along its axis 1, not along out_axes=0"
                     ) as info:
    scanagram.as_scan(lambda x: x.T, x)
  assert "`transpose` at" in str(info.value)  # the operation that made it
  assert "test_api.py" in str(info.value)     # and the user's line
  fns = scanagram.to_step(lambda x: x.T * 2, x, out_axes=1)
  carry, out = fns.prefill(x[:2])
  np.testing.assert_allclose(out, (x[:2] * 2).T, rtol=1e-6)
  carry, y = fns.step(carry, x[2])
  np.testing.assert_allclose(y, x[2] * 2, rtol=1e-6)


def test_shape_dtype_struct_examples():
  spec = jax.ShapeDtypeStruct((L, D), jnp.float32)
  step, init = scanagram.as_scan(lambda x: jnp.cumsum(x, 0), spec)
  assert_trees_close(lax.scan(step, init, X)[1], jnp.cumsum(X, 0))
  pspec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       PARAMS)
  fns = scanagram.to_step(model, pspec, spec, in_axes=(None, 0))
  assert_trees_close(run_steps(fns, PARAMS, X)[1], model(PARAMS, X))
  assert isinstance(fns.carry_spec()["position"], jax.ShapeDtypeStruct)


def test_no_scanned_argument_refused():
  with pytest.raises(ValueError, match="at least one scanned argument"):
    scanagram.to_step(model, PARAMS, X, in_axes=(None, None))


def test_mismatched_lengths_refused():
  with pytest.raises(ValueError, match="share their length"):
    scanagram.as_scan(lambda xs: xs[0][:4] + xs[1], (X, X[:4]))


def test_dead_code_is_not_converted():
  """A value read only for its shape (``zeros_like(xs[1:])``, as
  recurrentgemma writes) is dead code: never converted, never refused."""
  def fun(xs):
    padding = jnp.zeros_like(xs[1:])      # xs[1:] alone would be refused
    return jnp.cumsum(xs, 0) + padding.sum()
  check_scan(fun, X)

  def live(xs):                            # the same slice, read: refused
    return jnp.cumsum(xs, 0)[1:] + xs[1:]
  check_refused(live, X, "slice", "a future element")


def test_prng_keys_as_unscanned_arguments():
  """Typed PRNG keys (an NNX model's random streams) pass through the
  argument checks of to_step and of a StepPair converting at first use."""
  keys = jax.random.split(jax.random.key(0), 3)

  def f(keys, xs):
    return jnp.cumsum(xs, 0) + 0 * jax.random.uniform(keys[0], ())
  xs = jnp.ones((4, 2))
  fns = scanagram.to_step(f, keys, xs, in_axes=(None, 0))
  carry, out = fns.prefill(keys, xs[:2])
  assert_trees_close(out, f(keys, xs)[:2])
  pair = scanagram.StepPair(f, None, xs, 0, num_unscanned=1)
  assert int(pair.positions(pair.init(keys))) == 0


def test_closed_over_constants_are_fetched_only_when_a_rule_needs_them(
    monkeypatch):
  """A weight closed over by the function is never read on the host (an
  array sharded across processes could not be); a closed-over mask is,
  since its proof needs its values."""
  from scanagram import interpreter
  fetched = []
  original = interpreter._fetched
  monkeypatch.setattr(interpreter, "_fetched",
                      lambda c: fetched.append(np.shape(c)) or original(c))
  w = jax.random.normal(jax.random.key(0), (4, 5))
  mask = jnp.tril(jnp.ones((6, 6), bool))

  def weights_only(xs):                      # xs: [6, 4]
    return jnp.cumsum(jnp.tanh(xs @ w), 0)
  xs = jnp.ones((6, 4))
  scanagram.to_step(weights_only, xs)
  assert fetched == []

  def attention(xs):
    scores = jnp.where(mask, xs @ xs.T, -1e9)
    return jax.nn.softmax(scores) @ xs
  scanagram.to_step(attention, xs)
  assert (6, 6) in fetched
