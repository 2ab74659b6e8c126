"""Sharded models on 8 host devices. The device count is fixed when JAX
starts, so each check runs in a fresh interpreter with ``XLA_FLAGS`` set
first (``run_on_8_devices``)."""
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import NamedSharding, PartitionSpec

from scanagram.rules.sharding import without_axis


def run_on_8_devices(code: str) -> str:
  """Runs ``code`` with 8 host CPU devices; returns its stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      "--xla_force_host_platform_device_count=8 "
      "--xla_backend_optimization_level=0"))
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_without_axis_leaves_only_the_scanned_axis_unsharded():
  import jax
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
  assert without_axis(sharding, 1, 3).spec == PartitionSpec("data", None,
                                                             None)
  assert without_axis(sharding, 2, 3) is sharding      # already unsharded
  assert without_axis(None, 0, 1) is None


def test_sequence_parallel_constraint_adds_no_collectives_to_the_step():
  """A constraint sharding time over 'model' (sequence parallelism) holds
  for the training mode; a step of one element leaves time unsharded, so
  its compiled program gathers nothing (it all-reduced 4 times when the
  constraint was copied as traced)."""
  out = run_on_8_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import scanagram
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    B, L, D = 4, 16, 32
    w = jax.random.normal(jax.random.key(0), (D, D)) / 6
    x = jax.random.normal(jax.random.key(1), (B, L, D))

    def f(w, x):                                   # x: [B, L, D]
      h = jnp.tanh(x @ w)
      h = jax.lax.with_sharding_constraint(
          h, NamedSharding(mesh, P("data", "model", None)))
      return jnp.cumsum(h, axis=1)

    want = jax.jit(f)(w, x)
    fns = scanagram.to_step(f, w, x, in_axes=(None, 1), out_axes=1)
    for p in (0, 5, L):
      carry, out = jax.jit(fns.prefill)(w, x[:, :p])
      np.testing.assert_allclose(out, want[:, :p], atol=1e-5)
    step = jax.jit(fns.step)
    carry, _ = jax.jit(fns.prefill)(w, x[:, :5])
    for t in range(5, L):
      carry, y = step(w, carry, x[:, t])
      np.testing.assert_allclose(y, want[:, t], atol=1e-5)
    hlo = step.lower(w, carry, x[:, 5]).compile().as_text()
    print(sum(hlo.count(c) for c in ("all-gather", "all-reduce",
                                     "collective-permute", "all-to-all")))
  """)
  assert out.split() == ["0"], out


def test_torch_refuses_split_arrays_and_export_gathers_sharded_parameters():
  """TorchStepper with parameters split over 8 devices refuses with what
  to do (not DLPack's BufferError); replicated ones cross; save gathers
  sharded parameters whole, and the loaded step equals the model."""
  out = run_on_8_devices("""
    import tempfile, os
    import jax, jax.numpy as jnp, numpy as np, torch
    from jax.sharding import NamedSharding, PartitionSpec as P
    from scanagram.stepping import StepPair
    from scanagram.adapters.torch import TorchStepper, export_step, load_step
    mesh = jax.make_mesh((8,), ("model",))
    B, L, D = 2, 6, 16
    w = jax.random.normal(jax.random.key(0), (D, D)) / 4
    xs = jax.random.normal(jax.random.key(1), (B, L, D))

    def f(w, xs):
      return jnp.cumsum(jnp.tanh(xs @ w), axis=1)
    pair = StepPair(f, (w,), xs, axis=1)
    split = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    try:
      TorchStepper(pair, split)(torch.from_numpy(np.asarray(xs[:, 0])))
      print("no error")
    except ValueError as err:
      print("refused" if "spread over 8 devices" in str(err) and
            "jax.device_put(params" in str(err) else repr(err))
    replicated = jax.device_put(w, NamedSharding(mesh, P()))
    y = TorchStepper(pair, replicated)(torch.from_numpy(np.asarray(xs[:, 0])))
    np.testing.assert_allclose(y.numpy(), f(w, xs)[:, 0], atol=1e-5)
    path = os.path.join(tempfile.mkdtemp(), "step.zip")
    export_step(pair, split, path)
    loaded = load_step(path)
    out = loaded.reset(torch.from_numpy(np.asarray(xs)))
    np.testing.assert_allclose(out.numpy(), f(w, xs), atol=1e-5)
    print("exported")
  """)
  assert out.split() == ["refused", "exported"], out


def test_carry_shardings_make_init_shard_the_caches_and_steps_keep_them():
  """Megatron-style parameters (heads over 'model') and a prompt over
  'data': carry_shardings gives the key/value buffers batch over 'data'
  and heads over 'model'; init makes them so (each device holds 1/8, not
  the whole cache), steps keep them and match the training mode."""
  out = run_on_8_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from scanagram import StepPair
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    B, L, D, H = 4, 16, 32, 4

    def f(w, x):                                  # x: [B, L, D]
      q, k, v = (jnp.einsum("bld,dhk->bhlk", x, w[n]) for n in "qkv")
      s = jnp.einsum("bhlk,bhmk->bhlm", q, k)
      s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e9)
      o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
      return jnp.einsum("bhlk,hkd->bld", o, w["o"])
    keys = jax.random.split(jax.random.key(0), 5)
    w = {n: jax.random.normal(keys[i], (D, H, D // H)) / 6
         for i, n in enumerate("qkv")}
    w["o"] = jax.random.normal(keys[3], (H, D // H, D)) / 6
    heads = NamedSharding(mesh, P(None, "model", None))
    placed = {n: jax.device_put(w[n], heads) for n in "qkv"}
    placed["o"] = jax.device_put(w["o"], NamedSharding(mesh, P("model")))
    x = jax.random.normal(keys[4], (B, L, D))
    want = jax.jit(f)(w, x)
    rows = NamedSharding(mesh, P("data", None, None))
    pair = StepPair(f, (w,), x, axis=1)
    shardings = pair.carry_shardings(placed, prompt_sharding=rows)
    carry = pair.init(placed, shardings=shardings)
    caches = [a for name, a in carry.items() if name != "position"]
    assert len(caches) == 2
    # the description is enough to write those specs by hand
    from scanagram import describe_carry
    for name, leaf in describe_carry(pair).items():
      if name == "position":
        continue
      spec = [None] * len(leaf.shape)
      spec[leaf.batch_axes[0]], spec[leaf.batch_axes[1]] = "data", "model"
      got = tuple(shardings[name].spec)
      assert got + (None,) * (len(spec) - len(got)) == tuple(spec), (
          leaf, got)
    for a in caches:
      assert tuple(a.sharding.spec)[:2] == ("data", "model"), a.sharding
      assert a.addressable_shards[0].data.size * 8 == a.size
    xs = jax.device_put(x, rows)
    for t in range(6):
      carry, y = pair.step(placed, carry, xs[:, t])
      np.testing.assert_allclose(y, want[:, t], atol=1e-5)
    assert all(tuple(a.sharding.spec)[:2] == ("data", "model")
               for name, a in carry.items() if name != "position")
    print("sharded")
  """)
  assert out.split() == ["sharded"], out


def test_explicit_mesh_axes_keep_their_shardings_through_the_conversion():
  """Under explicit mesh axes (``jax.make_mesh``'s default) shardings are
  types: the conversion traces with the example's, ``reshard`` (written by
  the user, and inserted by ``jnp.where`` on a mask placed on the mesh)
  converts on the scanned path and on scores, and every state -- key/value
  buffers, rings of a sliding window, a convolution's queue, a running
  sum -- is created with the placement of what it stores. Prefill, extend,
  steps, carry_shardings and init all match the training mode."""
  out = run_on_8_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, reshard
    from scanagram import StepPair
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    assert set(mesh.explicit_axes) == {"data", "model"}, mesh
    B, L, D, H = 4, 16, 32, 4

    def attend(w, x, window=None):
      q, k, v = (jnp.einsum("bld,dhk->bhlk", x, w[n]) for n in "qkv")
      s = jnp.einsum("bhlk,bhmk->bhlm", q, k)
      i = jnp.arange(L)
      mask = i[:, None] >= i[None, :]
      if window:
        mask &= i[:, None] - i[None, :] < window
      s = jnp.where(reshard(mask, P()), s, -1e9)
      o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
      return jnp.einsum("bhlk,hkd->bld", o, w["o"],
                        out_sharding=P("data", None, None))

    def f(w, x):
      x = reshard(x, P("data", None, None))
      h = x + attend(w, jnp.tanh(x))
      h = h + attend(w, h, window=4)
      conv = jax.lax.conv_general_dilated(
          jnp.pad(h, ((0, 0), (2, 0), (0, 0))), w["conv"], (1,), "VALID",
          dimension_numbers=("NWC", "WIO", "NWC"))
      return jnp.cumsum(h, axis=1) + conv

    keys = jax.random.split(jax.random.key(0), 6)
    w = {n: jax.random.normal(keys[i], (D, H, D // H)) / 6
         for i, n in enumerate("qkv")}
    w["o"] = jax.random.normal(keys[3], (H, D // H, D)) / 6
    w["conv"] = jax.random.normal(keys[5], (3, D, D)) / 6
    x = jax.random.normal(keys[4], (B, L, D))
    with jax.set_mesh(mesh):
      heads = NamedSharding(mesh, P(None, "model", None))
      placed = {n: jax.device_put(w[n], heads) for n in "qkv"}
      placed["o"] = jax.device_put(w["o"], NamedSharding(mesh, P("model")))
      placed["conv"] = jax.device_put(w["conv"], NamedSharding(mesh, P()))
      rows = NamedSharding(mesh, P("data", None, None))
      xs = jax.device_put(x, rows)
      want = np.asarray(jax.jit(f)(placed, xs))
      pair = StepPair(f, (placed,), xs, axis=1)
      for p in (1, 5, L):
        carry, out = pair.prefill(placed, xs[:, :p])
        np.testing.assert_allclose(out, want[:, :p], atol=1e-4)
      carry, _ = pair.prefill(placed, xs[:, :3])
      carry, out = pair.extend(placed, carry, xs[:, 3:7])
      np.testing.assert_allclose(out, want[:, 3:7], atol=1e-4)
      for t in range(7, 10):
        carry, y = pair.step(placed, carry, xs[:, t])
        np.testing.assert_allclose(y, want[:, t], atol=1e-4)
      shardings = pair.carry_shardings(placed, prompt_sharding=rows)
      carry = pair.init(placed, shardings=shardings)
      for t in range(L):
        carry, y = pair.step(placed, carry, xs[:, t])
        np.testing.assert_allclose(y, want[:, t], atol=1e-4)
      caches = [a for a in jax.tree.leaves(carry) if a.ndim == 4]
      assert len(caches) == 4, jax.tree.map(jax.typeof, carry)
      for a in caches:   # [B@data, H@model, time, dh]: 1/8 per device
        assert str(jax.typeof(a)).startswith("float32[4@data,4@model,"), (
            jax.typeof(a))
        assert a.addressable_shards[0].data.size * 8 == a.size
      try:    # rows are converted one at a time: refused, with what to do
        StepPair(f, (placed,), xs, axis=1, batch_axis=0)
      except ValueError as e:
        assert "automatic" in str(e) and "batch_axes" in str(e), e
      else:
        raise AssertionError("rows under explicit axes were not refused")
      # unsharded examples under the explicit mesh: rows convert, unless the
      # code names a mesh axis on the batch (refused with the same advice)
      def g(w, x):
        return jnp.cumsum(jnp.tanh(x @ w), 1)
      W, ones = jnp.eye(3), jnp.ones((2, 6, 3))
      rows_pair = StepPair(g, (W,), ones, axis=1, batch_axis=0)
      _, out = rows_pair.prefill(W, ones[:, :4], lengths=[4, 2])
      np.testing.assert_allclose(out[1, :, 0], [np.tanh(1), 2 * np.tanh(1),
                                                0, 0], rtol=1e-6)
      try:
        StepPair(lambda w, x: g(w, reshard(x, P("data"))), (W,), ones,
                 axis=1, batch_axis=0)
      except ValueError as e:
        assert "automatic" in str(e) and "one row" in str(e), e
      else:
        raise AssertionError("a sharded batch of one row was not refused")
      print("explicit")
  """)
  assert out.split() == ["explicit"], out


def test_stepper_and_generate_keep_the_carry_shardings_and_donate_in_place():
  """carry_shardings from a PartitionSpec under jax.set_mesh; a Stepper bound
  with them starts from a sharded carry, and its steps, extend and reset
  keep every cache's sharding, updating the caches in place (the donated
  buffers are the ones the next carry holds; XLA would warn if it could
  not use a donation)."""
  out = run_on_8_devices("""
    import os, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from scanagram import StepPair
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    B, L, D, H, V = 4, 16, 32, 4, 11

    def f(w, tokens):                                  # tokens: [B, L]
      x = w["embed"][tokens]
      q, k, v = (jnp.einsum("bld,dhk->bhlk", x, w[n]) for n in "qkv")
      s = jnp.einsum("bhlk,bhmk->bhlm", q, k)
      s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e9)
      o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
      h = x + jnp.einsum("bhlk,hkd->bld", o, w["o"])
      return h @ w["out"]
    keys = jax.random.split(jax.random.key(0), 8)
    w = {n: jax.random.normal(keys[i], (D, H, D // H)) / 6 for i, n in enumerate("qkv")}
    w["o"] = jax.random.normal(keys[3], (H, D // H, D)) / 6
    w["embed"] = jax.random.normal(keys[4], (V, D))
    w["out"] = jax.random.normal(keys[5], (D, V)) / 6
    tokens = jax.random.randint(keys[6], (B, L), 0, V)
    want = jax.jit(f)(w, tokens)
    heads = NamedSharding(mesh, P(None, "model", None))
    placed = {n: jax.device_put(w[n], heads) for n in "qkv"}
    placed["o"] = jax.device_put(w["o"], NamedSharding(mesh, P("model")))
    for n in ("embed", "out"):
      placed[n] = jax.device_put(w[n], NamedSharding(mesh, P()))
    ts = jax.device_put(tokens, NamedSharding(mesh, P("data", None)))
    pair = StepPair(f, (w,), tokens, axis=1)
    with jax.set_mesh(mesh):
      shardings = pair.carry_shardings(placed, prompt_sharding=P("data", None))
    caches = lambda c: {n: a.sharding.spec for n, a in c.items() if n != "position"}
    print(jax.tree.map(lambda s: s.spec, shardings))
    with warnings.catch_warnings():
      warnings.simplefilter("error")      # a donation XLA cannot use warns
      stepper = pair.bind(placed, shardings=shardings)
      first = caches(stepper.carry)
      ids = [a.addressable_shards[0].data.unsafe_buffer_pointer() for a in jax.tree.leaves(stepper.carry) if a.ndim == 4]
      for t in range(5):
        y = stepper(ts[:, t])
        np.testing.assert_allclose(y, want[:, t], atol=1e-4)
      assert caches(stepper.carry) == first, (caches(stepper.carry), first)
      print(ids, [a.addressable_shards[0].data.unsafe_buffer_pointer() for a in jax.tree.leaves(stepper.carry) if a.ndim == 4])
      y = stepper.extend(ts[:, 5:8])
      np.testing.assert_allclose(y, want[:, 5:8], atol=1e-4)
      assert caches(stepper.carry) == first
      stepper.reset(ts[:, :4])
      assert caches(stepper.carry) == first, caches(stepper.carry)
      out = pair.generate(placed, ts[:, :4], 4, lambda k, y: jnp.argmax(y, -1))
    print("kept")
  """)
  assert out.split()[-1] == "kept", out


def test_two_processes_under_jax_distributed():
  """Two processes on localhost (gloo collectives), parameters sharded
  across both: conversion reads no parameter, the steps match the training
  mode, and saving the parameters is refused with what to do."""
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  runs = [subprocess.Popen([sys.executable, worker, str(i), port], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for i in range(2)]
  outs = [run.communicate(timeout=300)[0] for run in runs]
  for i, (run, out) in enumerate(zip(runs, outs)):
    assert run.returncode == 0 and f"process {i}: ok" in out, out[-3000:]
