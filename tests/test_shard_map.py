"""``jax.shard_map`` on the scanned path: converts when no spec splits the
scanned axis (the body per device, collectives pointwise along time),
refused naming the spec otherwise. One-device meshes run here; the checks
on 2x4 devices run in one subprocess (``run_on_8_devices``)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

import scanagram
from conftest import check_refused, check_scan
from scanagram.interpreter import rule_for
from scanagram.kinds import Scanned
from scanagram.rules.shard_map import shard_map_p, shard_map_rule
from test_sharding import run_on_8_devices

L, B, D = 6, 2, 4


def _mesh():
  return jax.make_mesh((1,), ("x",), axis_types=(AxisType.Auto,))


def _xs(seed=1):
  return jax.random.normal(jax.random.key(seed), (L, B, D))


def test_the_rule_is_found_for_the_traced_primitive():
  f = jax.shard_map(lambda x: x * 2, mesh=_mesh(), in_specs=P(None, "x"),
                    out_specs=P(None, "x"))
  eqn, = jax.make_jaxpr(f)(_xs()).jaxpr.eqns
  assert eqn.primitive is shard_map_p
  assert rule_for(eqn.primitive, [Scanned(0)]) is shard_map_rule


def test_a_body_with_state_and_collectives_converts_on_one_device():
  """Batch split, time whole: a shift, a running sum and a cumulative
  maximum per device, with psum, pmax, ppermute, axis_index and an
  untiled all_gather acting position by position."""
  mesh = _mesh()
  w = jax.random.normal(jax.random.key(0), (D, D)) / 2

  def body(w, x):                               # [L, B, D] per device
    h = jnp.tanh(x @ w)
    prev = jnp.concatenate([jnp.zeros_like(h[:1]), h[:-1]])
    h = jax.lax.psum(h + prev, "x") * (1 + jax.lax.axis_index("x"))
    h = jnp.cumsum(h, 0) + jax.lax.cummax(jax.lax.pmax(h, "x"), axis=0)
    h = h + jax.lax.ppermute(h, "x", [(0, 0)])
    return h + jax.lax.all_gather(h, "x", axis=1).sum(1)

  f = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(None, "x")),
                    out_specs=P(None, "x"))
  check_scan(lambda xs: f(w, xs), _xs())


def test_a_shard_map_of_parameters_only_runs_unchanged():
  mesh = _mesh()
  w = jax.random.normal(jax.random.key(0), (D, D))
  gathered = jax.shard_map(
      lambda w: jax.lax.all_gather(w, "x", tiled=True, to="invarying") / 4,
      mesh=mesh, in_specs=P("x"), out_specs=P())
  check_scan(lambda xs: jnp.cumsum(xs @ gathered(w), 0), _xs(),
             prefill_lengths=[2])


def test_rows_convert_under_batch_axes():
  mesh = _mesh()
  f = jax.shard_map(lambda x: jnp.cumsum(jax.lax.psum(x, "x"), 0),
                    mesh=mesh, in_specs=P(None, None, "x"),
                    out_specs=P(None, None, "x"))
  xs = _xs()
  want = f(xs)
  fns = scanagram.to_step(f, xs, batch_axes=1, out_batch_axes=1)
  carry, out = fns.prefill(xs[:4], lengths=jnp.array([2, 4]))
  np.testing.assert_allclose(out[:2, 0], want[:2, 0], atol=1e-5)
  np.testing.assert_allclose(out[:, 1], want[:4, 1], atol=1e-5)
  carry, y = fns.step(carry, xs[4])
  np.testing.assert_allclose(y[1], want[4, 1], atol=1e-5)
  np.testing.assert_allclose(y[0], want[1, 0] + xs[4, 0], atol=1e-5)


def test_specs_that_split_the_scanned_axis_are_refused_naming_them():
  mesh = _mesh()
  split_in = jax.shard_map(lambda x: jnp.cumsum(x, 0), mesh=mesh,
                           in_specs=P("x"), out_specs=P("x"))
  check_refused(lambda xs: split_in(xs), _xs(), "in_spec P('x')", "scanned axis 0 over 'x'",
                "P(None, 'x', None)")
  split_out = jax.shard_map(lambda x: jnp.cumsum(x, 0), mesh=mesh,
                            in_specs=P(), out_specs=P("x"), check_vma=False)
  check_refused(lambda xs: split_out(xs), _xs(), "out_spec P('x')", "scanned axis 0")


def test_collectives_along_the_scanned_axis_are_refused():
  mesh = _mesh()

  def sharded(body):
    return jax.shard_map(body, mesh=mesh, in_specs=P(None, "x"),
                         out_specs=P(None, "x"))
  check_refused(sharded(lambda x: jax.lax.all_gather(x, "x", tiled=True)),
                _xs(), "`all_gather`", "concatenates the devices' values "
                "along the scanned axis 0")
  check_refused(sharded(lambda x: jax.lax.psum_scatter(x, "x", tiled=True)),
                _xs(), "psum_scatter", "along the scanned axis 0")
  check_refused(sharded(lambda x: jax.lax.all_to_all(x, "x", 0, 2,
                                                     tiled=True)),
                _xs(), "all_to_all", "along the scanned axis 0")


def test_sharded_over_2x4_devices():
  """Megatron-style attention + MLP (heads and hidden units over 'model',
  batch over 'data', psum over 'model'): prefills, extend and steps match
  the training mode, and the caches are per device (1/8 each). A body of
  running sums, shifts and collectives on features split over 'model';
  a shard_map of parameters only; one under explicit mesh axes (sharding
  in the types); refusals on 8 real devices."""
  out = run_on_8_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import scanagram
    from scanagram import StepPair
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    B, L, D, H, F = 4, 8, 16, 4, 32
    dh = D // H

    def check(fns, args, want, prefills=(0, 1, 5, L)):
      for p in prefills:
        carry, out = fns.prefill(*args, x[:, :p])
        np.testing.assert_allclose(out, want[:, :p], atol=1e-5)
      carry, _ = fns.prefill(*args, x[:, :2])
      carry, out = fns.extend(*args, carry, x[:, 2:5])
      np.testing.assert_allclose(out, want[:, 2:5], atol=1e-5)
      for t in range(5, L):
        carry, y = fns.step(*args, carry, x[:, t])
        np.testing.assert_allclose(y, want[:, t], atol=1e-5)
      return carry

    def layer(w, x):                    # per device: [B/2, L, D], H/4 heads
      q, k, v = (jnp.einsum("bld,dhk->bhlk", x, w[n]) for n in "qkv")
      s = jnp.einsum("bhlk,bhmk->bhlm", q, k) / np.sqrt(dh)
      s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -1e9)
      o = jnp.einsum("bhlm,bhmk->bhlk", jax.nn.softmax(s, -1), v)
      h = x + jax.lax.psum(jnp.einsum("bhlk,hkd->bld", o, w["o"]), "model")
      return h + jax.lax.psum(jax.nn.gelu(h @ w["up"]) @ w["down"], "model")

    specs = {n: P(None, "model", None) for n in "qkv"}
    specs.update(o=P("model"), up=P(None, "model"), down=P("model"))
    megatron = jax.shard_map(layer, mesh=mesh, in_specs=(specs, P("data")),
                             out_specs=P("data"))
    keys = jax.random.split(jax.random.key(0), 7)
    w = {n: jax.random.normal(keys[i], (D, H, dh)) / 4
         for i, n in enumerate("qkv")}
    w["o"] = jax.random.normal(keys[3], (H, dh, D)) / 4
    w["up"] = jax.random.normal(keys[4], (D, F)) / 4
    w["down"] = jax.random.normal(keys[5], (F, D)) / 6
    x = jax.random.normal(keys[6], (B, L, D))
    fns = scanagram.to_step(megatron, w, x, in_axes=(None, 1), out_axes=1)
    carry = check(fns, (w,), jax.jit(megatron)(w, x))
    caches = [a for a in jax.tree.leaves(carry) if a.ndim == 5]
    # [devices, B/2, H/4, L, dh]: each device its own keys and values
    assert [a.shape for a in caches] == [(8, 2, 1, L, dh)] * 2, caches
    pair = StepPair(megatron, (w,), x, axis=1)
    placed = {n: jax.device_put(w[n], NamedSharding(mesh, specs[n]))
              for n in w}
    rows = NamedSharding(mesh, P("data"))
    carry = pair.init(placed, shardings=pair.carry_shardings(
        placed, prompt_sharding=rows))
    caches = [a for a in jax.tree.leaves(carry) if a.ndim == 5]
    assert len(caches) == 2 and all(
        a.addressable_shards[0].data.size * 8 == a.size for a in caches)
    carry, y = pair.step(placed, carry, x[:, 0])
    np.testing.assert_allclose(y, jax.jit(megatron)(w, x)[:, 0], atol=1e-5)
    print("megatron")

    def running(w, x):                  # per device: [B/2, L, D/4]
      full = jax.lax.all_gather(x, "model", axis=2, tiled=True)
      h = jnp.tanh(full @ w)
      prev = jnp.pad(h, ((0, 0), (1, 0), (0, 0)))[:, :-1]
      h = jnp.cumsum(h + 0.5 * prev, axis=1)
      h = h + jax.lax.ppermute(h, "model", [(i, (i + 1) % 4)
                                            for i in range(4)])
      h = h * (1 + jax.lax.axis_index("model"))
      top = jax.lax.pmax(jnp.max(h, axis=2, keepdims=True), "model")
      both = jax.lax.all_gather(h, "data", axis=0).sum(0)
      return h - top + 0.1 * both + jax.lax.psum_scatter(
          full, "model", scatter_dimension=2, tiled=True)
    features = P("data", None, "model")
    running = jax.shard_map(running, mesh=mesh,
                            in_specs=(P(None, "model"), features),
                            out_specs=features)
    v = jax.random.normal(keys[0], (D, D)) / 4
    fns = scanagram.to_step(running, v, x, in_axes=(None, 1), out_axes=1)
    check(fns, (v,), jax.jit(running)(v, x), prefills=(0, 3))
    print("running")

    gathered = jax.shard_map(lambda v: jax.lax.all_gather(
        v, "model", tiled=True, to="invarying"), mesh=mesh,
        in_specs=P("model"), out_specs=P())
    params_only = lambda v, x: jnp.cumsum(x @ gathered(v), axis=1)
    fns = scanagram.to_step(params_only, v, x, in_axes=(None, 1), out_axes=1)
    check(fns, (v,), params_only(v, x), prefills=(3,))
    print("parameters")

    explicit = jax.make_mesh((2, 4), ("data", "model"))   # (types)
    with jax.set_mesh(explicit):
      typed = jax.shard_map(
          lambda v, x: jax.lax.psum(jnp.cumsum(jnp.tanh(x @ v), 1) @ v.T,
                                    "model"),
          mesh=explicit, in_specs=(P(None, "model"), P("data")),
          out_specs=P("data"))
      v = jax.device_put(v, NamedSharding(explicit, P(None, "model")))
      x = jax.device_put(x, NamedSharding(explicit, P("data")))
      fns = scanagram.to_step(typed, v, x, in_axes=(None, 1), out_axes=1)
      check(fns, (v,), jax.jit(typed)(v, x), prefills=(3,))
    print("explicit")

    for fun, *fragments in [
        (jax.shard_map(lambda x: jnp.cumsum(x, 1), mesh=mesh,
                       in_specs=P("data", "model"),
                       out_specs=P("data", "model")),
         "in_spec P('data', 'model')", "scanned axis 1 over 'model'"),
        (jax.shard_map(lambda x: jax.lax.all_gather(x, "model", axis=1,
                                                    tiled=True),
                       mesh=mesh, in_specs=P("data", None, "model"),
                       out_specs=P("data", None, "model")),
         "`all_gather`", "along the scanned axis 1")]:
      try:
        scanagram.to_step(fun, x, in_axes=1, out_axes=1)
        print("converted")
      except scanagram.ScanConversionError as err:
        assert all(f in str(err) for f in fragments), err
    print("refused")
  """)
  assert out.split() == ["megatron", "running", "parameters", "explicit",
                         "refused"], out
