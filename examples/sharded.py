"""The transformer of examples/transformer.py served on a 2x4 (data, model)
mesh of 8 host devices: Megatron-style parameters, sharded KV caches.

The model is written once, in training mode, unaware of any mesh. Its
parameters are placed with `jax.device_put` (attention heads and the MLP's
hidden units over `model`, the rest replicated), prompts over `data`, and the
derived prefill/step run on them as they are: XLA partitions them (automatic
mesh axes). The script checks the sharded step against the unsharded
training mode, makes the carry with `pair.carry_shardings` + `pair.init`
(each device holds 1/8 of every key/value cache), counts the collectives in
the compiled step beside those of a hand-written sharded KV-cache step
(HandWrittenStep, which benchmarks/sharded.py times against the derived
one), checks that both steps compute the same logits and generates
greedily from a batch of prompts.

Run: python examples/sharded.py [--smoke] [--help]
"""
import os

# 8 CPU devices; must be set before jax is imported (common imports it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import common  # noqa: E402  (puts the repository on sys.path)
import scanagram  # noqa: E402
from benchmarks import baselines  # noqa: E402
from scanagram.adapters.haiku import to_step  # noqa: E402
from transformer import make_model  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter",
               "collective-permute", "all-to-all")


def megatron_spec(path: str, shape, model_size: int = 4) -> P:
  """The PartitionSpec of one Haiku parameter, from its name and shape.

  Haiku's Linear stores ``w`` as [in, out] and ``b`` as [out]. Megatron
  splits each block into a column-parallel layer followed by a row-parallel
  one, so the activations between them stay split and only the block's
  output needs one all-reduce (the sum over `model`).
  """
  spec = _megatron_spec(path)
  # The shape decides whether the split is possible: a dimension that does
  # not divide evenly over `model` stays whole (replicated) instead.
  if any(axis == "model" and dim % model_size
         for axis, dim in zip(spec, shape)):
    return P()
  return spec


def _megatron_spec(path: str) -> P:
  module, name = path.rsplit("/", 1)
  if re.search(r"multi_head_attention(_\d+)?/(query|key|value)$", module):
    # q/k/v: output = heads * head_size; heads are independent, so each
    # device computes (and caches keys/values for) H/4 heads.
    return P(None, "model") if name == "w" else P("model")
  if re.search(r"multi_head_attention(_\d+)?/linear$", module):
    # Output projection: its input is the concatenated heads, already split
    # over `model`; rows over `model`, partial sums all-reduced. Its bias is
    # added once, after the sum: replicated.
    return P("model", None) if name == "w" else P()
  if re.search(r"mlp(_\d+)?/~/linear_0$", module):
    # MLP up: columns (the 4*d hidden units) over `model`; gelu is
    # elementwise, so the hidden activations stay split.
    return P(None, "model") if name == "w" else P("model")
  if re.search(r"mlp(_\d+)?/~/linear_1$", module):
    # MLP down: rows (the hidden units) over `model`; bias replicated.
    return P("model", None) if name == "w" else P()
  # Embeddings, positions, LayerNorms and the (small) vocabulary head:
  # replicated -- every device needs all of them for every token.
  return P()


def place(params, mesh):
  """(params placed Megatron-style on ``mesh``, {name: spec})."""
  specs, placed = {}, {}
  for module, leaves in params.items():
    placed[module] = {}
    for name, value in leaves.items():
      spec = megatron_spec(f"{module}/{name}", value.shape,
                           mesh.shape["model"])
      specs[f"{module}/{name}"] = spec
      placed[module][name] = jax.device_put(value, NamedSharding(mesh, spec))
  return placed, specs


def baseline_names(params, layers: int):
  """The example's parameters (the same arrays) under the names
  benchmarks/models.py gives the same transformer, which the hand-written
  step of benchmarks/baselines.py reads.

  Haiku numbers repeated modules in creation order: block i has
  ``layer_norm_{2i}``, ``multi_head_attention_{i}``, ``layer_norm_{2i+1}``
  and ``mlp_{i}``; then come the final ``layer_norm_{2L}`` and ``linear``.
  """
  def numbered(name, i):
    return name if i == 0 else f"{name}_{i}"

  renamed = {"embed": params["embed"], "~": params["~"],
             "ln_out": params[numbered("layer_norm", 2 * layers)],
             "unembed": params["linear"]}
  for i in range(layers):
    renamed[f"ln_attn_{i}"] = params[numbered("layer_norm", 2 * i)]
    renamed[f"ln_mlp_{i}"] = params[numbered("layer_norm", 2 * i + 1)]
    for proj in ("query", "key", "value", "linear"):
      renamed[f"attn_{i}/{proj}"] = params[
          f"{numbered('multi_head_attention', i)}/{proj}"]
    for j in range(2):
      renamed[f"mlp_{i}/~/linear_{j}"] = params[
          f"{numbered('mlp', i)}/~/linear_{j}"]
  return renamed


class HandWrittenStep:
  """The hand-written KV-cache step (benchmarks/baselines.py,
  ``TransformerCache``) served on ``mesh`` as an expert writes it: each
  layer's key and value caches ``[B, H, L, dh]`` placed with batch over
  `data` and heads over `model` (each device keeps the keys and values of
  the heads its Megatron shard of q/k/v computes), the step jitted with
  explicit in/out shardings and the carry donated.

  ``step(params, carry, x)`` takes the example's parameters, like the
  derived step; carry ``{"k": [per layer], "v": [per layer], "t": int32}``.
  """

  def __init__(self, mesh, d_model, heads, layers, length, batch):
    self.layers = layers
    self.cache = baselines.TransformerCache(d_model, heads, layers, length,
                                            batch)
    kv = NamedSharding(mesh, P("data", "model", None, None))
    self.carry_shardings = {"k": [kv] * layers, "v": [kv] * layers,
                            "t": NamedSharding(mesh, P())}
    self.token_sharding = NamedSharding(mesh, P("data"))
    self.logits_sharding = NamedSharding(mesh, P("data", None))
    # zero caches made in place on the mesh (never whole on one device);
    # jitted once: a retrace per call is slow, and a benchmark's untimed
    # setup that long changes the timed step after it (benchmarks/sharded.py)
    self._init = jax.jit(self.cache.init, out_shardings=self.carry_shardings)

  def init(self, params):
    """The carry before any token, sharded."""
    return self._init(params)

  def step(self, params, carry, x):
    """``x: [B]`` tokens -> ``(carry, logits [B, VOCAB])``."""
    carry, logits = self.cache.step(baseline_names(params, self.layers),
                                    carry, x)
    # keeps the caches where they are when the step runs inside a loop
    # (a lax.scan), where no out_shardings pins the carry
    return jax.lax.with_sharding_constraint(carry,
                                            self.carry_shardings), logits

  def jitted(self, params):
    """The step jitted with in/out shardings (``params``' own), the carry
    donated."""
    param_shardings = jax.tree.map(lambda a: a.sharding, params)
    return jax.jit(
        self.step,
        in_shardings=(param_shardings, self.carry_shardings,
                      self.token_sharding),
        out_shardings=(self.carry_shardings, self.logits_sharding),
        donate_argnums=1)


def count_collectives(hlo: str):
  """{collective: number of ops} in compiled HLO text (async *-start ops
  counted once, their *-done not at all)."""
  return {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}


def main(argv=None):
  args = common.parser(
      __doc__.splitlines()[0], d_model=128, heads=8, layers=2, length=64,
      batch=4, steps=1000, learning_rate=3e-3, prompt_length=12, generate=32,
      seed=0).parse_args(argv)
  if args.smoke:
    args.d_model, args.heads, args.layers, args.length = 32, 4, 2, 16
    args.batch, args.steps, args.prompt_length, args.generate = 4, 3, 6, 8
  assert len(jax.devices()) == 8, jax.devices()
  # q/k/v columns split in 4 contiguous blocks: whole heads only if H % 4 == 0.
  assert args.heads % 4 == 0 and args.batch % 2 == 0, (args.heads, args.batch)
  mesh = jax.make_mesh((2, 4), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  print(f"mesh: {dict(mesh.shape)} over {len(jax.devices())} "
        f"{jax.devices()[0].platform} devices")

  # -- the model: ~20 s of training (--steps 0: just initialised) ----------
  model = make_model(args.d_model, args.heads, args.layers, args.length)
  tokens = common.python_corpus(200_000 if args.smoke else 2_000_000)
  if args.steps:
    params, _ = common.train(
        model, tokens, steps=args.steps, batch=8, length=args.length,
        learning_rate=args.learning_rate, seed=args.seed)
  else:
    params = model.init(jax.random.key(args.seed),
                        jnp.zeros((1, args.length), jnp.int32))
  apply = jax.jit(lambda p, seq: model.apply(p, None, seq))

  # -- Megatron-style placement -----------------------------------------------
  params_sharded, specs = place(params, mesh)
  print("parameter placement (name: shape -> spec):")
  for name, spec in specs.items():
    module, leaf = name.rsplit("/", 1)
    shape = tuple(params[module][leaf].shape)
    print(f"  {name:<44} {str(shape):<12} {spec}")

  rows = NamedSharding(mesh, P("data", None))      # prompts: batch over data
  rng = np.random.default_rng(args.seed)
  starts = rng.integers(0, len(tokens) - args.length, args.batch)
  sequence = jnp.asarray(np.stack([tokens[s:s + args.length]
                                   for s in starts]))          # [B, L]

  example = jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32)
  pair = to_step(model, example, axis=1)

  # -- equivalence: sharded prefill + steps vs unsharded training mode --------
  half = args.length // 2
  placed_seq = jax.device_put(sequence, rows)
  carry, out = pair.prefill(params_sharded, placed_seq[:, :half])
  outs = [out]
  for t in range(half, args.length):
    carry, y = pair.step(params_sharded, carry, placed_seq[:, t])
    outs.append(y[:, None])
  stepped = jnp.concatenate(outs, 1)
  full = apply(params, sequence)               # unsharded params, one device
  err = float(jnp.max(jnp.abs(np.asarray(stepped) - np.asarray(full))))
  print(f"equivalence: max |step - training mode| = {err:.2e} "
        "(tolerance 1e-04)")
  assert err < 1e-4, err

  # -- the carry: made sharded, 1/8 per device --------------------------------
  shardings = pair.carry_shardings(params_sharded, prompt_sharding=rows)
  carry = pair.init(params_sharded, shardings=shardings)
  print("carry shardings (from pair.carry_shardings):")
  for path, a in jax.tree_util.tree_flatten_with_path(carry)[0]:
    name = jax.tree_util.keystr(path)
    per_device = a.addressable_shards[0].data.size
    print(f"  {name:<44} {str(a.shape):<20} {a.sharding.spec}  "
          f"{per_device}/{a.size} per device")
    if a.ndim >= 4:                          # a key/value cache
      assert per_device * 8 == a.size, (name, a.sharding)

  # -- collectives in the compiled step: derived, hand-written, one device --
  x = jax.device_put(sequence[:, 0], NamedSharding(mesh, P("data")))
  step = jax.jit(pair.functions.step)
  sharded_hlo = step.lower(params_sharded, carry, x).compile().as_text()
  hand = HandWrittenStep(mesh, args.d_model, args.heads, args.layers,
                         args.length, args.batch)
  hand_step = hand.jitted(params_sharded)
  hand_carry = hand.init(params_sharded)
  hand_hlo = hand_step.lower(params_sharded, hand_carry,
                             x).compile().as_text()
  single = jax.devices()[0]
  params_one = jax.device_put(params, single)
  carry_one = jax.device_put(pair.init(params_one), single)
  single_hlo = step.lower(params_one, carry_one,
                          jax.device_put(sequence[:, 0], single)
                          ).compile().as_text()
  ops = {"derived (2x4 mesh)": count_collectives(sharded_hlo),
         "hand-written (2x4)": count_collectives(hand_hlo),
         "single device": count_collectives(single_hlo)}
  print("collectives in the compiled steps:")
  print(f"  {'':<20}" + "".join(f"{side:>21}" for side in ops))
  for c in COLLECTIVES:
    print(f"  {c:<20}" + "".join(f"{n[c]:>21}" for n in ops.values()))
  assert sum(ops["single device"].values()) == 0, ops
  print(f"  (Megatron needs one all-reduce per attention and per MLP: "
        f"{2 * args.layers} for {args.layers} layers; the caches stay put)")

  # -- the derived step computes the hand-written step's logits ---------------
  worst, scale = 0.0, 1.0
  for t in range(args.length):
    x = jax.device_put(sequence[:, t], hand.token_sharding)
    carry, y = step(params_sharded, carry, x)
    hand_carry, y_hand = hand_step(params_sharded, hand_carry, x)
    worst = max(worst, float(jnp.max(jnp.abs(y - y_hand))))
    scale = max(scale, float(jnp.max(jnp.abs(y_hand))))
  print(f"derived vs hand-written sharded step: max |difference| = "
        f"{worst:.2e} over {args.length} tokens (tolerance "
        f"{1e-5 * scale:.1e}: 1e-05 of the largest logit)")
  assert worst < 1e-5 * scale, (worst, scale)

  # -- generation ---------------------------------------------------------------
  prompt = jax.device_put(sequence[:, :args.prompt_length], rows)
  steps = min(args.generate, args.length - args.prompt_length + 1)
  generated = pair.generate(params_sharded, prompt, steps,
                            scanagram.sampling.greedy)
  print(f"generated ({steps} greedy tokens per row, sharding "
        f"{generated.sharding.spec if hasattr(generated.sharding, 'spec') else generated.sharding}):")
  for b in range(args.batch):
    text = common.decode(prompt[b]) + "|" + common.decode(generated[b])
    print(f"  row {b}: {text!r}")


if __name__ == "__main__":
  main()
