"""Sharded serving: the derived step of the make-demo transformer
(examples/transformer.py ``make_model``) on a 2x4 (data, model) mesh of 8
host devices, against the hand-written sharded KV-cache step of
examples/sharded.py (``HandWrittenStep``).

Both sides read the same parameters, placed Megatron-style
(examples/sharded.py ``place``: heads and MLP hidden units over `model`),
on a mesh with automatic axes. The derived carry is made with
``pair.carry_shardings`` + ``pair.init(shardings=...)``; the hand-written
caches ``[B, H, L, dh]`` are placed batch over `data`, heads over `model`.
Both are checked against the (unsharded) training mode, then N steps of
each run in one jitted ``lax.scan`` (carry donated), interleaved, medians.
The device count is fixed when JAX starts, so all of it runs in a fresh
process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.

Usage: python -m benchmarks.sharded [--smoke]

JSON keys added by :func:`bench_sharded`:
  sharded_step_ratio: derived / hand-written per-token time (target <=
    1.10).
  sharded_collectives_extra: collectives (all-reduce, all-gather,
    reduce-scatter, collective-permute, all-to-all) in the derived step's
    compiled HLO minus the hand-written one's (target <= 0).
  sharded_step_collectives, sharded_handwritten_collectives: the two
    counts; sharded_step_ms_derived, sharded_step_ms_hand_written: the
    absolute times behind the ratio.
"""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
FULL = dict(batch=8, length=256, d_model=256, heads=8, layers=2, steps=64,
            repeats=31, warmup=1)
SMOKE = dict(batch=2, length=16, d_model=32, heads=4, layers=2, steps=8,
             repeats=2, warmup=1)


def _example():
  """examples/sharded.py as a module, loaded by path (a plain ``import
  sharded`` may find this file), its directory on sys.path for the
  ``common`` and ``transformer`` it imports."""
  import importlib.util
  examples = str(ROOT / "examples")
  if examples not in sys.path:
    sys.path.insert(0, examples)
  if "sharded_example" not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        "sharded_example", ROOT / "examples" / "sharded.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sharded_example"] = module
    spec.loader.exec_module(module)
  return sys.modules["sharded_example"]


def _scan_steps_sharded(step, in_shardings, out_shardings):
  """``baselines.scan_steps`` jitted with explicit in/out shardings, as the
  hand-written side is served."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  def run(params, carry, xs):
    carry, ys = lax.scan(lambda c, x: step(params, c, x), carry, xs.T)
    return carry, jnp.moveaxis(ys, 0, 1)
  return jax.jit(run, in_shardings=in_shardings,
                 out_shardings=out_shardings, donate_argnums=1)


def measure(config: dict) -> dict:
  """In this process (which must have 8 devices): the figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from benchmarks import baselines
  from benchmarks.run import check_close
  from benchmarks.timing import interleaved
  from scanagram.adapters.haiku import to_step

  example = _example()
  c = config
  b, length = c["batch"], c["length"]
  assert len(jax.devices()) == 8, jax.devices()
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  model = example.make_model(c["d_model"], c["heads"], c["layers"], length)
  tokens = jax.random.randint(jax.random.key(1), (b, length), 0,
                              example.common.VOCAB, jnp.int32)
  params = model.init(jax.random.key(0), tokens)
  params_sharded, _ = example.place(params, mesh)
  rows = NamedSharding(mesh, P("data", None))
  xs = jax.device_put(tokens[:, :c["steps"]], rows)
  want = jax.jit(lambda p, seq: model.apply(p, None, seq))(params, tokens)

  pair = to_step(model, jax.ShapeDtypeStruct((b, length), jnp.int32), axis=1)
  derived_shardings = pair.carry_shardings(params_sharded,
                                           prompt_sharding=rows)
  hand = example.HandWrittenStep(mesh, c["d_model"], c["heads"], c["layers"],
                                 length, b)
  param_shardings = jax.tree.map(lambda a: a.sharding, params_sharded)
  # the derived step as a user runs it: jitted on placed arguments, no
  # shardings given. Both setups are a cached jitted init (~1 ms): on a
  # 2-core host an untimed setup of ~50 ms (a retrace) made the timed run
  # after it ~25% faster, whichever side it was.
  runs = {
      "derived": (lambda: pair.init(params_sharded,
                                    shardings=derived_shardings),
                  baselines.scan_steps(pair.functions.step)),
      "hand_written": (lambda: hand.init(params_sharded), _scan_steps_sharded(
          hand.step, (param_shardings, hand.carry_shardings, rows),
          (hand.carry_shardings, NamedSharding(mesh, P("data", None, None))))),
  }
  for side, (init, run) in runs.items():
    _, ys = run(params_sharded, init(), xs)
    check_close(f"sharded {side} step", np.asarray(ys),
                np.asarray(want[:, :c["steps"]]))

  t = interleaved({side: (init, lambda carry, run=run: run(params_sharded,
                                                            carry, xs))
                   for side, (init, run) in runs.items()},
                  repeats=c["repeats"], warmup=c["warmup"])

  x = jax.device_put(tokens[:, 0], hand.token_sharding)
  derived_hlo = jax.jit(pair.functions.step).lower(
      params_sharded, runs["derived"][0](), x).compile().as_text()
  hand_hlo = hand.jitted(params_sharded).lower(
      params_sharded, hand.init(params_sharded), x).compile().as_text()
  counts = {side: example.count_collectives(hlo)
            for side, hlo in (("derived", derived_hlo),
                              ("hand_written", hand_hlo))}
  n = c["steps"]
  return {"sharded_step_ratio": t["derived"] / t["hand_written"],
          "sharded_collectives_extra": (sum(counts["derived"].values()) -
                                        sum(counts["hand_written"].values())),
          "sharded_step_collectives": sum(counts["derived"].values()),
          "sharded_handwritten_collectives": sum(
              counts["hand_written"].values()),
          "sharded_step_ms_derived": 1e3 * t["derived"] / n,
          "sharded_step_ms_hand_written": 1e3 * t["hand_written"] / n,
          "collectives": counts}


def measure_in_subprocess(config: dict) -> dict:
  code = ("import json, sys; from benchmarks.sharded import measure; "
          f"print(json.dumps(measure({config!r})))")
  flags = (os.environ.get("XLA_FLAGS", "") +
           " --xla_force_host_platform_device_count=8").strip()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  # stderr passes through: JAX's warnings and a failure's traceback show
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_sharded(results: dict, config=None) -> None:
  """Adds sharded_step_ratio, sharded_collectives_extra and their
  diagnostics to ``results``."""
  r = measure_in_subprocess(FULL if config is None else config)
  counts = r.pop("collectives")
  results.update(r)
  print(f"  sharded: step ratio {r['sharded_step_ratio']:.3f} "
        f"({r['sharded_step_ms_derived']:.3f} vs "
        f"{r['sharded_step_ms_hand_written']:.3f} ms/token); collectives "
        f"derived {counts['derived']}, hand-written {counts['hand_written']}",
        flush=True)


if __name__ == "__main__":
  figures = {}
  bench_sharded(figures, SMOKE if "--smoke" in sys.argv else FULL)
  print(json.dumps(figures, indent=1))
