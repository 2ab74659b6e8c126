"""scanagram.adapters.torch: jax2torch, TorchStepper, export_step /
load_step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scanagram.adapters.torch import (  # noqa: E402
    jax2torch, to_jax, to_torch)


def _np(x):
  if isinstance(x, torch.Tensor):
    x = x.detach().float().numpy()
  return np.asarray(x, np.float64)


def _close(got, want, tol=1e-5):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(
      _np(g), _np(w), rtol=tol, atol=tol), got, want)


# -- jax2torch -----------------------------------------------------------------
def test_values_and_gradients_equal_torch_ops():
  @jax2torch
  def f(x, w):
    return jnp.sin(x) @ w

  gen = torch.Generator().manual_seed(0)
  x = torch.randn(2, 3, generator=gen, requires_grad=True)
  w = torch.randn(3, 4, generator=gen, requires_grad=True)
  y = f(x, w)
  ct = torch.randn(2, 4, generator=gen)
  y.backward(ct)

  x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone(
  ).requires_grad_()
  y2 = torch.sin(x2) @ w2
  y2.backward(ct)
  assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
  _close(y.detach(), y2.detach())
  _close(x.grad, x2.grad)
  _close(w.grad, w2.grad)


def test_gradcheck_in_float64_with_x64():
  """torch.autograd.gradcheck (finite differences in float64) agrees with
  the VJP, for two outputs, when JAX runs with x64 as float64 needs."""
  f = jax2torch(lambda x, w: (jnp.sin(x) @ w, jnp.sum(jnp.tanh(x) ** 2)))
  gen = torch.Generator().manual_seed(1)
  with jax.enable_x64(True):
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    w = torch.randn(4, 2, generator=gen, dtype=torch.float64,
                    requires_grad=True)
    assert f(x, w)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, (x, w))


def test_gradient_of_a_chain_with_torch_ops_and_expanded_gradients():
  # sum().backward() hands on an expanded (stride 0) gradient: made
  # contiguous before it crosses.
  f = jax2torch(lambda x: jnp.tanh(x) * 3.0)
  x = torch.linspace(-1, 1, 6).reshape(2, 3).requires_grad_()
  (f(x * 2).sum() + (x ** 2).sum()).backward()
  x2 = x.detach().clone().requires_grad_()
  ((torch.tanh(x2 * 2) * 3.0).sum() + (x2 ** 2).sum()).backward()
  _close(x.grad, x2.grad)


def test_pytrees_in_and_out():
  @jax2torch
  def f(params, xs):
    h = xs[0] @ params["w"] + params["b"]
    return {"h": h, "pair": (h.sum(), xs[1] * 2)}

  w = torch.randn(3, 2, requires_grad=True)
  b = torch.zeros(2, requires_grad=True)
  x0, x1 = torch.randn(4, 3), torch.randn(5)
  out = f({"w": w, "b": b}, [x0, x1])
  assert set(out) == {"h", "pair"} and isinstance(out["pair"], tuple)
  _close(out["h"].detach(), (x0 @ w + b).detach())
  _close(out["pair"][1], x1 * 2)
  (out["h"].sum() + out["pair"][0]).backward()
  _close(b.grad, torch.full((2,), 8.0))
  _close(w.grad, 2 * x0.sum(0)[:, None].expand(3, 2))


def test_integer_inputs_and_outputs():
  @jax2torch
  def f(table, ids):
    return table[ids], jnp.argmax(table[ids], -1), ids + 1

  table = torch.randn(5, 3, requires_grad=True)
  ids = torch.tensor([0, 4, 4, 1], dtype=torch.int32)
  rows, best, ids1 = f(table, ids)
  assert best.dtype == torch.int32 and ids1.dtype == torch.int32
  assert not best.requires_grad and rows.requires_grad
  assert ids1.tolist() == [1, 5, 5, 2]
  assert best.tolist() == table[ids.long()].argmax(-1).tolist()
  rows.sum().backward()
  _close(table.grad[:, 0], [1.0, 1.0, 0.0, 0.0, 2.0])
  # int64, torch's default integer type, is converted to JAX's int32 (x64 off)
  _, _, ids1 = f(table, ids.long())
  assert ids1.dtype == torch.int32 and ids1.tolist() == [1, 5, 5, 2]


def test_integer_inputs_get_no_gradient_through_autograd_function():
  @jax2torch
  def f(x, n):
    return x * n.astype(x.dtype)

  x = torch.ones(3, requires_grad=True)
  n = torch.tensor([1, 2, 3], dtype=torch.int32)
  f(x, n).sum().backward()
  assert x.grad.tolist() == [1.0, 2.0, 3.0] and n.grad is None


def test_no_grad_path_skips_the_vjp():
  traces = []

  @jax2torch
  def f(x):
    traces.append(x.shape)
    return jnp.exp(x)

  x = torch.zeros(3, requires_grad=True)
  with torch.no_grad():
    y = f(x)
  assert y.grad_fn is None and not y.requires_grad
  y = f(torch.zeros(3))                    # nothing requires grad
  assert y.grad_fn is None and y.tolist() == [1.0, 1.0, 1.0]
  (traced,) = f.jitted_structures.values()
  assert traced._with_vjp == {}            # the VJP was never built
  assert len(traces) == 1
  assert f(x).grad_fn is not None


def test_jitted_once_per_signature():
  traces = []

  @jax2torch
  def f(x, scale):
    traces.append((x.shape, scale))
    return x * scale

  for _ in range(3):
    f(torch.ones(2), 2.0)
  assert len(traces) == 1
  f(torch.ones(3), 2.0)                    # new shape: new trace
  f(torch.ones(3), 3.0)                    # Python numbers are static
  assert len(traces) == 3
  assert f(torch.ones(3), 3.0).tolist() == [3.0, 3.0, 3.0]


def test_zero_copy_both_ways():
  t = torch.arange(16, dtype=torch.float32)
  a = to_jax(t)
  assert a.unsafe_buffer_pointer() == t.data_ptr()
  b = jnp.arange(8.0)
  assert to_torch(b).data_ptr() == b.unsafe_buffer_pointer()
  # jax2torch outputs view the JAX output buffer: check through identity-free
  # evidence that the tensor owns no copy (it is backed by a DLPack capsule).
  y = jax2torch(lambda x: x + 1)(t)
  assert y.tolist() == (t + 1).tolist()


def test_non_contiguous_inputs_are_made_contiguous():
  f = jax2torch(lambda x: x * 10)
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  for view in (base.t(), base[:, 1:3], base[::2], base[:1].expand(3, 4)):
    assert not view.is_contiguous()
    _close(f(view), view * 10)


def test_tensor_on_a_device_jax_lacks_is_refused():
  f = jax2torch(lambda x: x)
  with pytest.raises(ValueError, match="meta"):
    f(torch.empty(3, device="meta"))


def test_unaligned_tensor_is_copied_by_jax_but_correct():
  base = torch.arange(17, dtype=torch.float32)
  t = base[1:]                             # 4-byte offset: JAX on CPU copies
  assert t.is_contiguous()
  _close(to_jax(t), t)
  _close(jax2torch(lambda x: x * 2)(t), t * 2)


def test_bfloat16_and_bool():
  f = jax2torch(lambda x, m: jnp.where(m, x, 0).astype(jnp.bfloat16))
  x = torch.tensor([1.5, 2.5, 3.5], dtype=torch.bfloat16)
  m = torch.tensor([True, False, True])
  y = f(x, m)
  assert y.dtype == torch.bfloat16 and y.tolist() == [1.5, 0.0, 3.5]


def test_int64_outside_int32_is_refused_not_wrapped():
  """Without x64 JAX narrows int64 to int32 by wrapping (2**31 -> -2**31):
  such values are refused wherever a tensor crosses."""
  big = torch.tensor([1, 2 ** 31, -2 ** 31 - 1])
  with pytest.raises(ValueError, match=r"tensor: 2 of its int64 values lie "
                     r"outside the int32 range \[-2147483648, 2147483647\] "
                     r"\(e.g. 2147483648\)"):
    to_jax(big)
  f = jax2torch(lambda ids: ids + 1)
  with pytest.raises(ValueError, match="argument leaf 0: 2 of its int64"):
    f(big)
  with pytest.raises(ValueError, match=r"uint32 range \[0, 4294967295\] "
                     r"\(e.g. 18446744073709551615\)"):
    to_jax(torch.tensor([2 ** 64 - 1], dtype=torch.uint64))
  edge = torch.tensor([2 ** 31 - 1, -2 ** 31])          # the int32 extremes
  assert f(edge).dtype == torch.int32 and to_jax(edge).tolist() == [
      2 ** 31 - 1, -2 ** 31]
  with jax.enable_x64(True):                            # nothing is narrowed
    assert to_jax(big).dtype == jnp.int64 and to_jax(big).tolist() == (
        big.tolist())


# -- a small causal model ------------------------------------------------------
B, T, D, H = 2, 8, 3, 4


def _causal_model(params, xs):
  """xs: [B, T, D] (batch-major, time axis 1) -> {"y": [B, T, H],
  "n": [B, T] int32}: a causal 2-tap convolution, tanh, a running sum."""
  prev = jnp.pad(xs, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  h = jnp.tanh(xs @ params["w0"] + prev @ params["w1"] + params["b"])
  y = jnp.cumsum(h, axis=1)
  return {"y": y, "n": jnp.cumsum((h[..., 0] > 0).astype(jnp.int32), axis=1)}


def _params(seed=0):
  k0, k1, k2 = jax.random.split(jax.random.key(seed), 3)
  return {"w0": jax.random.normal(k0, (D, H)),
          "w1": jax.random.normal(k1, (D, H)),
          "b": jax.random.normal(k2, (H,))}


def _pair(fun, params, xs, axis):
  from adapters.haiku import StepPair
  return StepPair(fun, (params,), xs, axis)


@pytest.fixture(scope="module")
def model():
  params = _params()
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  pair = _pair(_causal_model, params, xs, axis=1)
  return pair, params, xs, _causal_model(params, xs)


def _t(x):
  return torch.from_dlpack(x)


def _time(tree, sl):
  return jax.tree.map(lambda a: a[:, sl], tree)


# -- TorchStepper --------------------------------------------------------------
from scanagram.adapters.torch import (  # noqa: E402
    TorchStepper, export_step, load_step)


@pytest.mark.parametrize("p", [0, 3, T])
def test_stepper_prefill_steps_and_run_equal_the_model(model, p):
  pair, params, xs, want = model
  stepper = TorchStepper(pair, params)
  out = stepper.reset(_t(xs[:, :p]))
  assert isinstance(out["y"], torch.Tensor) and out["n"].dtype == torch.int32
  assert out["y"].shape == (B, p, H)
  _close(out, _time(want, slice(0, p)))
  for t in range(p, min(p + 2, T)):
    y = stepper(_t(xs[:, t]))
    _close(y, _time(want, t))
  if p + 2 < T:
    ys = stepper.run(_t(xs[:, p + 2:]))
    assert ys["y"].shape == (B, T - p - 2, H)
    _close(ys, _time(want, slice(p + 2, T)))
  assert stepper.position == T


def test_stepper_without_prompt_and_run_in_pieces(model):
  pair, params, xs, want = model
  stepper = TorchStepper(pair, params)
  assert stepper.reset() is None and stepper.position == 0
  a = stepper.run(_t(xs[:, :5]))
  b = stepper.run(_t(xs[:, 5:]))
  _close(jax.tree.map(lambda u, v: torch.cat([u, v], 1), a, b), want)
  stepper.reset()                          # reset starts over
  _close(stepper(_t(xs[:, 0])), _time(want, 0))


def test_stepper_donates_the_carry(model):
  pair, params, xs, _ = model
  stepper = TorchStepper(pair, params)
  stepper.reset(_t(xs[:, :2]))
  old = stepper.carry
  stepper(_t(xs[:, 2]))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))
  old = stepper.carry
  stepper.run(_t(xs[:, 3:5]))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))


def test_stepper_takes_torch_parameters_and_non_contiguous_inputs(model):
  pair, params, xs, want = model
  torch_params = jax.tree.map(lambda a: torch.tensor(np.asarray(a)), params)
  stepper = TorchStepper(pair, torch_params)
  x_t = torch.tensor(np.asarray(xs[:, 0]).T.copy()).t()   # a transposed view
  assert not x_t.is_contiguous()
  _close(stepper(x_t), _time(want, 0))


def test_stepper_step_takes_every_form_of_a_matching_tensor(model):
  """A step's fast path (a NumPy view of x) and its full checks agree."""
  pair, params, xs, want = model
  stepper = TorchStepper(pair, params)
  x0 = _t(xs[:, 0])
  view = stepper._plain_x_view(x0)       # the fast path shares x's memory
  assert view.ctypes.data == x0.data_ptr()

  def form(t):             # element t in the form of step t
    x = _t(xs[:, t])
    if t == 0:
      return x.clone().requires_grad_()
    if t == 1:
      return torch.tensor(np.asarray(xs[:, t]).T.copy()).t()  # strided
    if t == 2:
      buffer = torch.zeros(B * D + 1)      # a view off the 16-byte alignment
      buffer[1:] = x.reshape(-1)
      return buffer[1:].view(B, D)
    return torch._neg_view(-x)             # a lazily negated tensor

  for t in range(4):
    _close(stepper(form(t)), _time(want, t))
  with pytest.raises(ValueError, match=r"expected shape"):
    stepper(torch.zeros(D, B))


def test_stepper_refuses_bad_inputs_saying_expected_and_got(model):
  pair, params, xs, _ = model
  stepper = TorchStepper(pair, params)
  with pytest.raises(ValueError, match=r"expected shape \(2, 3\), got "
                     r"\(2, 4\)"):
    stepper(torch.zeros(B, D + 1))
  with pytest.raises(ValueError, match="expected 3 dimensions"):
    stepper.run(torch.zeros(B, D))
  with pytest.raises(TypeError, match="expected dtype float32, got float64"):
    stepper(torch.zeros(B, D, dtype=torch.float64))
  with pytest.raises(TypeError, match="expected dtype float32, got int32"):
    stepper.run(torch.zeros(B, 2, D, dtype=torch.int32))
  with pytest.raises(TypeError, match="expected a torch.Tensor"):
    stepper(3.0)
  with pytest.raises(TypeError, match="structure"):
    stepper((torch.zeros(B, D),))
  with pytest.raises(ValueError, match=f"between 0 and {T}.*got {T + 1}"):
    stepper.reset(torch.zeros(B, T + 1, D))
  with pytest.raises(ValueError, match="meta"):
    stepper(torch.zeros(B, D, device="meta"))
  assert stepper.position == 0             # nothing was consumed


def _model_with_positions(params, xs):
  """_causal_model plus a learned position table: a state that needs L."""
  return _causal_model(params, xs + params["pos"][:xs.shape[1]])


def test_stepper_refuses_to_go_past_L_when_the_state_needs_it(model):
  _, params, xs, _ = model
  params = dict(params, pos=jax.random.normal(jax.random.key(5), (T, D)))
  pair = _pair(_model_with_positions, params, xs, axis=1)
  assert pair.max_length == T
  stepper = TorchStepper(pair, params)
  assert stepper.max_length == T
  stepper.run(_t(xs[:, :T - 1]))
  with pytest.raises(ValueError, match=f"between 1 and 1.*got 2"):
    stepper.run(_t(xs[:, :2]))
  with pytest.raises(ValueError, match=f"position {T}.*L={T}"):
    stepper.extend(_t(xs[:, :2]))
  _close(stepper.extend(_t(xs[:, T - 1:])),
         _time(_model_with_positions(params, xs), slice(T - 1, T)))
  with pytest.raises(ValueError, match=f"at most L={T}"):
    stepper(_t(xs[:, 0]))


def test_stepper_goes_past_L_when_the_state_does_not_need_it(model):
  """A 2-tap convolution and a running sum: no length-L state, so steps,
  run and extend go on past L and equal the model at that longer length."""
  pair, params, xs, _ = model
  assert pair.max_length is None
  longer = jax.random.normal(jax.random.key(6), (B, T + 5, D))
  want = _causal_model(params, longer)
  stepper = TorchStepper(pair, params)
  assert stepper.max_length is None
  _close(stepper.reset(_t(longer[:, :T - 1])), _time(want, slice(0, T - 1)))
  _close(stepper(_t(longer[:, T - 1])), _time(want, T - 1))
  _close(stepper(_t(longer[:, T])), _time(want, T))
  _close(stepper.run(_t(longer[:, T + 1:T + 3])),
         _time(want, slice(T + 1, T + 3)))
  _close(stepper.extend(_t(longer[:, T + 3:])), _time(want, slice(T + 3,
                                                                  T + 5)))
  assert stepper.position == T + 5


def test_step_past_L_after_a_full_length_prompt(model):
  pair, params, xs, _ = model
  longer = jnp.concatenate([xs, xs[:, :1] * 2], axis=1)
  stepper = TorchStepper(pair, params)
  stepper.reset(_t(xs))
  _close(stepper(_t(longer[:, T])), _time(_causal_model(params, longer), T))


def test_stepper_accepts_int64_for_int32_inputs():
  def model_fn(table, ids):                # ids: [B, T] int32
    return jnp.cumsum(jax.nn.one_hot(ids, 10) @ table, axis=1)

  table = jnp.arange(10.0 * 2).reshape(10, 2)
  ids = jnp.array([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)
  pair = _pair(model_fn, table, ids, axis=1)
  del pair.xs_spec        # the element spec is read from scanagram's to_step
  stepper = TorchStepper(pair, table)
  ys = stepper.run(torch.tensor(np.asarray(ids), dtype=torch.int64))
  _close(ys, model_fn(table, ids))
  with pytest.raises(TypeError, match="expected dtype int32, got float32"):
    stepper.reset(torch.zeros(2, 1))
  stepper.reset()
  with pytest.raises(ValueError, match=r"xs: 1 of its int64 values lie "
                     r"outside the int32 range .* \(e.g. 4294967296\)"):
    stepper.run(torch.tensor([[1, 2], [3, 2 ** 32]]))
  with pytest.raises(ValueError, match=r"x: 1 of its int64 values lie "
                     r"outside the int32 range"):
    stepper(torch.tensor([-2 ** 40, 5]))
  assert stepper.position == 0             # nothing was consumed


# -- export_step / load_step ---------------------------------------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402


_LOADER = textwrap.dedent("""
    import sys

    class _Block:                      # `import haiku` fails in this process
      def find_spec(self, name, path=None, target=None):
        if name == "haiku" or name.startswith("haiku."):
          raise ImportError("haiku is blocked in this process")
    sys.meta_path.insert(0, _Block())
    try:
      import haiku  # noqa: F401
      raise SystemExit("haiku should not be importable here")
    except ImportError:
      pass
    import numpy as np, torch
    from scanagram.adapters.torch import load_step

    data = dict(np.load({inputs!r}))
    stepper = load_step({path!r})
    out = {{}}
    prefill = stepper.reset(torch.from_numpy(data["prompt"]))
    out["prefill_y"], out["prefill_n"] = prefill["y"], prefill["n"]
    y = stepper(torch.from_numpy(data["x"]))
    out["step_y"], out["step_n"] = y["y"], y["n"]
    ys = stepper.run(torch.from_numpy(data["rest"]))
    out["run_y"], out["run_n"] = ys["y"], ys["n"]
    stepper.reset()
    out["full_y"] = stepper.run(torch.from_numpy(data["all"]))["y"]
    try:
      stepper.reset(torch.from_numpy(data["all"][:, :1]))
      out["refused"] = np.array(False)
    except ValueError as e:
      out["refused"] = np.array("prompt lengths" in str(e))
    assert "haiku" not in sys.modules or sys.modules["haiku"] is None
    np.savez({outputs!r}, **{{k: np.asarray(v) for k, v in out.items()}})
""")


def test_export_loads_in_a_process_without_haiku_or_model_code(model,
                                                               tmp_path):
  pair, params, xs, want = model
  p = 3
  path = str(tmp_path / "step.zip")
  assert export_step(pair, params, path, prompt_lengths=(p, 5)) == path
  inputs, outputs = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
  np.savez(inputs, prompt=np.asarray(xs[:, :p]), x=np.asarray(xs[:, p]),
           rest=np.asarray(xs[:, p + 1:]), all=np.asarray(xs))
  code = _LOADER.format(inputs=inputs, path=path, outputs=outputs)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  got = dict(np.load(outputs))
  for key in ("y", "n"):
    _close(got[f"prefill_{key}"], want[key][:, :p])
    _close(got[f"step_{key}"], want[key][:, p])
    _close(got[f"run_{key}"], want[key][:, p + 1:])
  _close(got["full_y"], want["y"])
  # the prefill is exported per length unless it is shape-polymorphic
  import json
  import zipfile
  meta = json.loads(zipfile.ZipFile(path).read("meta.json"))
  if not meta["prefill"]["symbolic"]:
    assert meta["prefill"]["lengths"] == [p, 5]
    assert bool(got["refused"])


def test_loaded_stepper_in_process_equals_the_live_one(model, tmp_path):
  pair, params, xs, want = model
  path = str(tmp_path / "step.zip")
  export_step(pair, params, path, prompt_lengths=(T,))
  loaded = load_step(path)
  assert loaded.axis == 1 and loaded.length == T
  _close(loaded.reset(_t(xs)), want)
  empty = loaded.reset(_t(xs[:, :0]))      # length 0: served by init
  assert empty["y"].shape == (B, 0, H)
  _close(loaded(_t(xs[:, 0])), _time(want, 0))
  _close(loaded.extend(_t(xs[:, 1:4])), _time(want, slice(1, 4)))  # steps
  assert loaded.position == 4
  with pytest.raises(ValueError, match=r"expected shape \(2, 3\)"):
    loaded(torch.zeros(B, D + 1))
  with pytest.raises(TypeError, match="loaded export takes no lengths"):
    loaded.extend(_t(xs[:, 4:6]), lengths=[1, 2])
  # the state needs no L: the loaded step goes on past it as well
  assert pair.max_length is None and loaded.max_length is None
  longer = jnp.concatenate([xs, xs[:, :2] * 2], axis=1)
  loaded.reset()
  _close(loaded.run(_t(longer)), _causal_model(params, longer))
  # parameters are stored beside the functions, not baked in
  assert len(loaded.pair.params) == len(jax.tree.leaves(params))


# -- with adapters.haiku -------------------------------------------------------
def _haiku_pair():
  import haiku as hk
  import adapters.haiku as adapters_haiku

  def forward(xs):                         # xs: [B, T, D], batch-major
    h = hk.Conv1D(H, kernel_shape=3, padding=hk.pad.causal)(xs)
    h = jax.nn.relu(h)
    lstm = hk.LSTM(H)
    ys, _ = hk.dynamic_unroll(lstm, h, lstm.initial_state(B),
                              time_major=False)
    return hk.Linear(2)(ys)

  model = hk.without_apply_rng(hk.transform(forward))
  xs = jax.random.normal(jax.random.key(2), (B, T, D))
  params = model.init(jax.random.key(3), xs)
  pair = adapters_haiku.to_step(model, xs, axis=1)
  return pair, params, xs, model.apply(params, xs)


def test_haiku_conv_lstm_through_stepper_and_export(tmp_path):
  pair, params, xs, want = _haiku_pair()
  stepper = TorchStepper(pair, params)
  _close(stepper.reset(_t(xs[:, :3])), want[:, :3], 1e-4)
  _close(stepper(_t(xs[:, 3])), want[:, 3], 1e-4)
  _close(stepper.run(_t(xs[:, 4:])), want[:, 4:], 1e-4)
  path = str(tmp_path / "hk.zip")
  export_step(pair, params, path, prompt_lengths=(3,))
  loaded = load_step(path)
  _close(loaded.reset(_t(xs[:, :3])), want[:, :3], 1e-4)
  _close(loaded.run(_t(xs[:, 3:])), want[:, 3:], 1e-4)


def test_stateful_model_through_stepper_and_export(tmp_path):
  """hk.transform_with_state (BatchNorm at inference): the state is passed
  after the parameters and read, not updated."""
  import haiku as hk
  import adapters.haiku as adapters_haiku

  def forward(xs, is_training=False):      # xs: [B, T, D]
    h = hk.Conv1D(H, kernel_shape=2, padding=hk.pad.causal)(xs)
    h = hk.BatchNorm(True, True, 0.9)(h, is_training=is_training)
    return hk.Linear(2)(jnp.tanh(h))

  model = hk.transform_with_state(forward)
  xs = jax.random.normal(jax.random.key(3), (B, T, D))
  params, state = model.init(jax.random.key(4), xs, is_training=True)
  state = jax.tree.map(lambda s: s + 0.5, state)   # not the defaults
  want, _ = model.apply(params, state, None, xs)
  pair = adapters_haiku.to_step(model, xs, axis=1, params=params,
                                state=state)
  with pytest.raises(TypeError, match="state"):
    TorchStepper(pair, params)
  path = str(tmp_path / "stateful.zip")
  export_step(pair, params, path, state=state, prompt_lengths=(3,))
  # without params=, the pair converts when the stepper first gets them
  lazy = adapters_haiku.to_step(model, xs, axis=1)
  for stepper in (TorchStepper(pair, params, state), load_step(path),
                  TorchStepper(lazy, params, state)):
    _close(stepper.reset(_t(xs[:, :3])), want[:, :3])
    _close(stepper(_t(xs[:, 3])), want[:, 3])
    _close(stepper.run(_t(xs[:, 4:])), want[:, 4:])


# -- rows: TorchStepper with per-row lengths -----------------------------------
RB = 3


@pytest.fixture(scope="module")
def rows_model():
  """_causal_model with batch_axis=0: each row has its own position."""
  from adapters.haiku import StepPair
  params = _params()
  xs = jax.random.normal(jax.random.key(7), (RB, T, D))
  return StepPair(_causal_model, (params,), xs, axis=1, batch_axis=0), params


def test_stepper_reset_with_lengths_and_extend_equal_jax(rows_model):
  pair, params = rows_model
  prompt = jax.random.normal(jax.random.key(8), (RB, 5, D))
  block = jax.random.normal(jax.random.key(9), (RB, 3, D))
  x = jax.random.normal(jax.random.key(10), (RB, D))
  stepper = TorchStepper(pair, params)
  assert stepper.positions.tolist() == [0] * RB

  lengths = [0, 5, 3]
  out = stepper.reset(_t(prompt), lengths=torch.tensor(lengths))
  carry, want = pair.prefill(params, prompt, lengths=lengths)
  assert isinstance(out["y"], torch.Tensor) and out["y"].shape == (RB, 5, H)
  _close(out, want)
  assert (out["y"][0] == 0).all() and (out["n"][2, 3:] == 0).all()
  assert stepper.positions.tolist() == lengths and stepper.position == 5

  old = stepper.carry
  ys = stepper.extend(_t(block), lengths=[3, 0, 2])
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old))  # donated
  carry, want = pair.extend(params, carry, block, lengths=[3, 0, 2])
  _close(ys, want)
  assert stepper.positions.tolist() == [3, 5, 5]
  _close(stepper.carry, carry)

  ys = stepper.extend(_t(block[:, :2]))        # every row takes both
  carry, want = pair.extend(params, carry, block[:, :2])
  _close(ys, want)
  _close(stepper(_t(x)), pair.step(params, carry, x)[1])
  assert stepper.positions.tolist() == [6, 8, 8] and stepper.position == 8

  # the rows are independent: row b equals the model on its own sequence
  seq = jnp.concatenate([prompt[1], block[1, :2], x[1:2]])[None]
  assert stepper.positions[1] == seq.shape[1]
  _close(jax.tree.map(lambda a: a[1:2], want),
         _time(_causal_model(params, seq), slice(5, 7)))


def test_stepper_lengths_refusals(rows_model, model):
  pair, params = rows_model
  stepper = TorchStepper(pair, params)
  with pytest.raises(ValueError, match=r"\[3\] integers"):
    stepper.reset(torch.zeros(RB, 2, D), lengths=torch.tensor([1, 2]))
  with pytest.raises(ValueError, match=r"lie in \[0, 2\]"):
    stepper.extend(torch.zeros(RB, 2, D), lengths=[0, 3, 1])
  with pytest.raises(TypeError, match="needs a prompt"):
    stepper.reset(lengths=[1, 1, 1])
  assert stepper.positions.tolist() == [0] * RB
  plain = TorchStepper(model[0], model[1])     # no batch_axis
  with pytest.raises(TypeError, match="batch_axis"):
    plain.reset(torch.zeros(B, 2, D), lengths=[1, 2])
  with pytest.raises(TypeError, match="batch_axis"):
    plain.extend(torch.zeros(B, 2, D), lengths=[1, 2])
  assert plain.position == 0


def test_stepper_generate_is_the_pairs(rows_model, model, tmp_path):
  pair, params = rows_model
  prompt = jax.random.normal(jax.random.key(13), (RB, 4, D))

  def sample(rng, y):                  # the next element from the output
    return jnp.tanh(y["y"][:, :D]) + 0.1 * jax.random.normal(rng, (RB, D))

  stepper = TorchStepper(pair, params)
  stepper.reset(_t(prompt[:, :1]))
  got = stepper.generate(_t(prompt), 3, sample, rng=5,
                         lengths=torch.tensor([4, 1, 2]))
  assert isinstance(got, torch.Tensor) and got.shape == (RB, 3, D)
  _close(got, pair.generate(params, prompt, 3, sample, rng=5,
                            lengths=[4, 1, 2]))
  assert stepper.positions.tolist() == [1] * RB   # its carry is untouched
  path = export_step(model[0], model[1], str(tmp_path / "s.zip"),
                     prompt_lengths=(2,))
  with pytest.raises(TypeError, match="a loaded export has no generation"):
    load_step(path).generate(torch.zeros(B, 2, D), 1, sample)


def test_haiku_attention_stepper_with_lengths_equals_jax():
  """A batch-major Haiku transformer with batch_axis=0: TorchStepper's
  reset(prompt, lengths=) and extend equal the Haiku Stepper's, and extend
  past L is refused."""
  import haiku as hk
  import adapters.haiku as adapters_haiku
  V = 7

  def forward(ids):                          # ids: [B, T] -> [B, T, V]
    t = ids.shape[1]
    x = hk.Embed(V, H)(ids) + hk.get_parameter(
        "pos", [T, H], init=hk.initializers.RandomNormal())[jnp.arange(t)]
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    x = x + hk.MultiHeadAttention(
        2, 2, w_init=hk.initializers.VarianceScaling())(x, x, x, mask=mask)
    return hk.Linear(V)(x)

  model = hk.without_apply_rng(hk.transform(forward))
  ids = jax.random.randint(jax.random.key(11), (RB, T), 0, V, jnp.int32)
  params = model.init(jax.random.key(12), ids)
  pair = adapters_haiku.to_step(model, ids, axis=1, batch_axis=0)
  assert pair.max_length == T
  stepper, jax_stepper = TorchStepper(pair, params), pair.bind(params)
  lengths, more = [4, 0, T], [2, 3, 0]
  _close(stepper.reset(_t(ids), lengths=lengths),
         jax_stepper.reset(ids, lengths=lengths), 1e-4)
  _close(stepper.extend(_t(ids[:, :3]), lengths=torch.tensor(more)),
         jax_stepper.extend(ids[:, :3], lengths=more), 1e-4)
  assert stepper.positions.tolist() == jax_stepper.positions.tolist() == [
      6, 3, T]
  # row 0 equals the model on its own sequence
  seq = jnp.concatenate([ids[0, :4], ids[0, :2]])[None]
  want = model.apply(params, seq)[0]
  out = stepper.extend(_t(ids[:, 3:5]), lengths=[2, 1, 0])
  carry_rows = jax_stepper.extend(ids[:, 3:5], lengths=[2, 1, 0])
  _close(out, carry_rows, 1e-4)
  want = model.apply(params, jnp.concatenate([seq, ids[:1, 3:5]], 1))[0]
  _close(out[0], want[6:8], 1e-4)
  with pytest.raises(ValueError, match=f"position {T}.*L={T}"):
    stepper.extend(_t(ids[:, :1]), lengths=[0, 1, 1])   # row 2 is at L
  with pytest.raises(ValueError, match=f"L={T}"):
    jax_stepper.extend(ids[:, :1], lengths=[0, 1, 1])
  _close(stepper.extend(_t(ids[:, :1]), lengths=[0, 1, 0]),
         jax_stepper.extend(ids[:, :1], lengths=[0, 1, 0]), 1e-4)
