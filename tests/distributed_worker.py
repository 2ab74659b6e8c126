"""One of two processes under ``jax.distributed`` on localhost (gloo
collectives, 4 CPU devices each), run by tests/test_sharding.py:
``python distributed_worker.py PROCESS_ID PORT``. Parameters sharded across
both processes; the derived prefill and steps must give the training
mode's outputs, and saving them must be refused clearly."""
import os
import sys
import tempfile


def main(process_id: int, port: str):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                             process_id=process_id)
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import scanagram
  from scanagram import export

  mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
  B, L, D = 2, 8, 16
  w_host = np.asarray(jax.random.normal(jax.random.key(0), (D, D))) / 4
  xs_host = np.asarray(jax.random.normal(jax.random.key(1), (B, L, D)))
  w = jax.make_array_from_callback(
      (D, D), NamedSharding(mesh, P(None, "model")), lambda i: w_host[i])
  xs = jax.make_array_from_callback(
      (B, L, D), NamedSharding(mesh, P()), lambda i: xs_host[i])
  assert not w.is_fully_addressable

  def f(w, xs):                                    # xs: [B, L, D]
    return jnp.cumsum(jnp.tanh(xs @ w), axis=1)

  fns = scanagram.to_step(f, w, xs, in_axes=(None, 1), out_axes=1)
  carry, _ = jax.jit(fns.prefill)(w, xs[:, :3])
  step = jax.jit(fns.step)
  for t in range(3, L):
    carry, y = step(w, carry, xs[:, t])
  want = np.cumsum(np.tanh(xs_host @ w_host), axis=1)[:, L - 1]
  got = multihost_utils.process_allgather(y, tiled=True)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  pair = scanagram.StepPair(f, (w,), xs, axis=1)
  try:
    export.save(pair, w, os.path.join(tempfile.mkdtemp(), "step.zip"))
    print("saved")
  except ValueError as err:
    assert "sharded across processes" in str(err), err
  print(f"process {process_id}: ok")


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
