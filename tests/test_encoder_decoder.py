"""Encoder-decoder models: unscanned work is done once, and a step's program
holds no full-length broadcast.

The models are written in plain JAX, batch-major: the source ``src: [B, S,
D]`` is unscanned, the target ``tgt: [B, L, D]`` scanned along axis 1. The
encoder (self-attention over the source) and the cross-attention keys and
values run in ``init``/``prefill`` and are carried; the step reads them from
the carry. Every size is distinct (but B = H), so that a shape names what
it holds: S is the source length, L the target length.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend import core as jex_core

import scanagram
from conftest import assert_trees_close, blocks, random_like

B, S, L, D, H, F = 2, 5, 7, 8, 2, 12
DH = D // H


# -- the models ----------------------------------------------------------------
def _params(seed, layers=2):
  def attention():
    return {"q": jnp.zeros((D, D)), "k": jnp.zeros((D, D)),
            "v": jnp.zeros((D, D)), "o": jnp.zeros((D, D)),
            "bk": jnp.zeros((D,)), "bv": jnp.zeros((D,))}

  def norm():
    return {"scale": jnp.zeros((D,)), "offset": jnp.zeros((D,))}
  shapes = {
      "encoder": [{"norm": norm(), "attn": attention(),
                   "up": jnp.zeros((D, F)), "down": jnp.zeros((F, D))}
                  for _ in range(layers)],
      "decoder": [{"norm_self": norm(), "self": attention(),
                   "norm_cross": norm(), "cross": attention(),
                   "norm_mlp": norm(), "up": jnp.zeros((D, F)),
                   "b_up": jnp.zeros((F,)), "down": jnp.zeros((F, D))}
                  for _ in range(layers)]}
  params = random_like(shapes, seed)
  return jax.tree.map(lambda x: x / np.sqrt(x.shape[0]) if x.ndim == 2
                      else 0.1 * x, params)


PARAMS = _params(0)
SRC = random_like(jnp.zeros((B, S, D)), 1)
TGT = random_like(jnp.zeros((B, L, D)), 2)


def layer_norm(p, x):
  """With its scale and offset broadcast to the full shape (along time
  too), as some code writes it: a step must not build them at length L."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  scale = jnp.broadcast_to(1 + p["scale"], x.shape)
  return (x - mean) * lax.rsqrt(var + 1e-5) * scale + p["offset"]


def attention(p, x, context, mask=None):
  """``x: [B, T, D]`` attends to ``context: [B, T', D]``."""
  b, t, _ = x.shape
  q = (x @ p["q"]).reshape(b, t, H, DH)
  k = (context @ p["k"] + p["bk"]).reshape(b, -1, H, DH)
  v = (context @ p["v"] + p["bv"]).reshape(b, -1, H, DH)
  logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(DH)
  if mask is not None:
    logits = jnp.where(mask, logits, -1e9)
  weights = jax.nn.softmax(logits, -1)
  out = jnp.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, D)
  return out @ p["o"]


def encode(params, src):
  h = src
  for p in params["encoder"]:
    a = layer_norm(p["norm"], h)
    h = h + attention(p["attn"], a, a)
    h = h + jax.nn.gelu(h @ p["up"]) @ p["down"]
  return h


def causal_mask(n):
  return jnp.tril(jnp.ones((n, n), bool))


def decoder_layer(p, h, memory, mask, up=None):
  a = layer_norm(p["norm_self"], h)
  h = h + attention(p["self"], a, a, mask)
  h = h + attention(p["cross"], layer_norm(p["norm_cross"], h), memory)
  up = p["up"] if up is None else up
  m = layer_norm(p["norm_mlp"], h)
  return h + jax.nn.relu(m @ up + p["b_up"]) @ p["down"]


def encdec(params, src, tgt):
  """Decoder layers in a Python loop."""
  memory = encode(params, src)
  h = tgt
  for p in params["decoder"]:
    h = decoder_layer(p, h, memory, causal_mask(tgt.shape[1]))
  return h


def stacked(params):
  return dict(params, decoder=jax.tree.map(lambda *a: jnp.stack(a),
                                           *params["decoder"]))


STACKED = stacked(PARAMS)


def encdec_scan(params, src, tgt):
  """Decoder layers in ``lax.scan`` over stacked parameters; the encoder's
  output and the mask are closed over (consts of the body)."""
  memory = encode(params, src)
  mask = causal_mask(tgt.shape[1])

  def layer(h, p):
    return decoder_layer(p, h, memory, mask), None
  h, _ = lax.scan(layer, tgt, params["decoder"])
  return h


def encdec_weight_norm(params, src, tgt):
  """The MLP's weight normalised (work on parameters alone)."""
  memory = encode(params, src)
  h = tgt
  for p in params["decoder"]:
    up = p["up"] / jnp.linalg.norm(p["up"], axis=0, keepdims=True)
    h = decoder_layer(p, h, memory, causal_mask(tgt.shape[1]), up)
  return h


def encdec_nested(params, src, flag, tgt):
  """The cross-attention in a jitted function and a ``lax.cond`` on an
  unscanned flag: the keys and values computed once live in the nested
  states."""
  memory = encode(params, src)
  h = tgt
  for p in params["decoder"]:
    a = layer_norm(p["norm_self"], h)
    h = h + attention(p["self"], a, a, causal_mask(tgt.shape[1]))
    cross = jax.jit(attention)
    x = layer_norm(p["norm_cross"], h)
    h = h + lax.cond(flag > 0, lambda x: cross(p["cross"], x, memory),
                     lambda x: cross(p["self"], x, memory), x)
  return h


# -- checks --------------------------------------------------------------------
def to_step(f, *args, rows=False, **options):
  n = len(args) - 1
  return scanagram.to_step(
      f, *args, in_axes=(None,) * n + (1,), out_axes=1,
      batch_axes=((None,) + (0,) * n) if rows else None,
      out_batch_axes=0 if rows else None, **options)


def check_steps(fns, f, unscanned, tgt, prefill_lengths=(0, 1, 3, L)):
  """check_scan's contract along axis 1, with unscanned arguments: stepping
  from init, a prefill of P then steps, and extend by blocks of 1, 2, 5
  give ``f``'s outputs, and end in the carry stepping ends in."""
  want = f(*unscanned, tgt)
  step = jax.jit(fns.step)   # one compiled step serves every prefill length

  def steps(carry, xs):   # xs: [B, T, D]
    ys = []
    for t in range(xs.shape[1]):
      carry, y = step(*unscanned, carry, xs[:, t])
      ys.append(y)
    return carry, jnp.stack(ys, axis=1)
  end, ys = steps(fns.init(*unscanned), tgt)
  assert_trees_close(ys, want)
  for p in prefill_lengths:
    carry, out = fns.prefill(*unscanned, tgt[:, :p])
    assert_trees_close(out, want[:, :p])
    assert np.all(np.asarray(fns.positions(carry)) == p)
    if p == L:
      continue
    _, ys = steps(carry, tgt[:, p:])
    assert_trees_close(ys, want[:, p:])
    for start, k in blocks(p, L):
      carry, ys = fns.extend(*unscanned, carry, tgt[:, start:start + k])
      assert_trees_close(ys, want[:, start:start + k])
    assert_trees_close(carry, end)
  return end


def check_ragged(fns, f, unscanned, tgt, lengths=(3, 5)):
  """With rows: a ragged prefill, then each row steps from its own
  position."""
  want = f(*unscanned, tgt)
  carry, out = fns.prefill(*unscanned, tgt[:, :max(lengths)],
                           lengths=np.array(lengths))
  for b, n in enumerate(lengths):
    assert_trees_close(out[b, :n], want[b, :n])
    assert not np.any(np.asarray(out[b, n:]))
  for t in range(L - max(lengths)):
    x = jnp.stack([tgt[b, n + t] for b, n in enumerate(lengths)])
    carry, y = fns.step(*unscanned, carry, x)
    for b, n in enumerate(lengths):
      assert_trees_close(y[b], want[b, n + t])


def carry_leaves(fns):
  return jax.tree.leaves(fns.carry_spec())


def no_parameter_in(carry, params):
  """No leaf of ``carry`` holds the values of a parameter (or of a view of
  one: the same values in another order or shape)."""
  values = [np.sort(np.ravel(p)) for p in jax.tree.leaves(params)]
  for leaf in jax.tree.leaves(carry):
    flat = np.sort(np.ravel(leaf))
    for v in values:
      assert not (flat.shape == v.shape and np.allclose(flat, v)), (
          f"a parameter of shape {v.shape} is in the carry")


def step_jaxpr(fns, unscanned, rows=False):
  carry = fns.carry_spec()
  x = jax.ShapeDtypeStruct((B, D), jnp.float32)
  closed = jax.make_jaxpr(fns.step)(*unscanned, carry, x)
  n_before = len(jax.tree.leaves(list(unscanned)))
  n_carry = len(jax.tree.leaves(carry))
  return closed.jaxpr, closed.jaxpr.invars[n_before:n_before + n_carry]


_VIEWS = {"transpose", "reshape", "convert_element_type", "copy", "squeeze",
          "expand_dims"}


def _subs(eqn):
  """``(jaxpr, the equation's operands its inputs are)`` per sub-jaxpr."""
  p = eqn.params
  name = eqn.primitive.name
  if name == "cond":
    return [(b.jaxpr, eqn.invars[1:]) for b in p["branches"]]
  if name == "while":
    nc = p["cond_nconsts"]
    return [(p["cond_jaxpr"].jaxpr,
             eqn.invars[:nc] + eqn.invars[nc + p["body_nconsts"]:]),
            (p["body_jaxpr"].jaxpr, eqn.invars[nc:])]
  out = []
  for value in p.values():
    body = getattr(value, "jaxpr", value)
    if isinstance(body, jex_core.Jaxpr):   # calls and scan: 1:1
      out.append((body, eqn.invars))
  return out


def _is_var(a):
  return not isinstance(a, jex_core.Literal)


def dots_over(jaxpr, carried, size):
  """For every dot_general (in sub-jaxprs too) with an operand that has an
  axis of length ``size``: whether one of its operands with such an axis is
  a carried value, or a view of one (transposed, reshaped, cast, sliced
  per layer by a scan)."""
  carried, found = set(carried), []
  for eqn in jaxpr.eqns:
    ops = [a for a in eqn.invars if _is_var(a)]
    if eqn.primitive.name == "dot_general" and any(
        size in a.aval.shape for a in ops):
      found.append(any(a in carried and size in a.aval.shape for a in ops))
    if eqn.primitive.name in _VIEWS and ops and ops[0] in carried:
      carried.update(eqn.outvars)
    for body, outer in _subs(eqn):
      inner = [v for v, a in zip(body.invars, outer)
               if _is_var(a) and a in carried]
      found += dots_over(body, inner, size)
  return found


def broadcasts_along(jaxpr, size):
  """The shapes of every broadcast_in_dim and iota (in sub-jaxprs too)
  with an axis of length ``size``."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("broadcast_in_dim", "iota"):
      shapes += [v.aval.shape for v in eqn.outvars if size in v.aval.shape]
    for body, _ in _subs(eqn):
      shapes += broadcasts_along(body, size)
  return shapes


def check_step_program(fns, unscanned, layers=2, per_layer=True):
  """The step's program: every contraction over a value with the source
  length S reads the cross-attention keys or values from the carry (q·Kᵀ
  and weights·V, two per layer), and no broadcast or iota builds the
  target length L except along the keys of the attention rows (the last
  axis of ``[.., H, 1, L]``)."""
  jaxpr, carry_vars = step_jaxpr(fns, unscanned)
  found = dots_over(jaxpr, carry_vars, S)
  assert all(found), (
      f"{found.count(False)} contractions over the source length S do not "
      "read carried keys/values: the step recomputes the encoder or the "
      "cross-attention projections")
  assert len(found) == (2 * layers if per_layer else 2), found
  for shape in broadcasts_along(jaxpr, L):
    assert shape.count(L) == 1 and shape[-1] == L, (
        f"the step builds {shape} (L={L} along a time axis)")


def check_carry(fns, params, scan=False, layers=2, rows=False):
  """Cross-attention K and V carried at ``[B, H, S, dh]`` (per layer, or
  stacked), the encoder's output ``[B, S, D]`` not, no parameter. (With
  rows, each row's ``[1, H, S, dh]``, rows first.)"""
  with_s = [x.shape for x in carry_leaves(fns) if S in x.shape]
  kv = (1 if rows else B, H, S, DH)
  kv = (layers,) + kv if scan else kv
  kv = (B,) + kv if rows else kv
  assert sorted(with_s) == [kv] * (2 if scan else 2 * layers), with_s
  carry = jax.jit(fns.init)(params, SRC)
  no_parameter_in(carry, params)


# -- tests ---------------------------------------------------------------------
def test_encoder_decoder_matches_training_mode():
  fns = to_step(encdec, PARAMS, SRC, TGT)
  check_steps(fns, encdec, (PARAMS, SRC), TGT)
  check_carry(fns, PARAMS)
  check_step_program(fns, (PARAMS, SRC))


def test_decoder_layers_in_scan_carry_stacked_keys_values():
  fns = to_step(encdec_scan, STACKED, SRC, TGT)
  check_steps(fns, encdec_scan, (STACKED, SRC), TGT)
  check_carry(fns, STACKED, scan=True)
  check_step_program(fns, (STACKED, SRC), per_layer=False)


@pytest.mark.parametrize("f, params", [(encdec, PARAMS),
                                       (encdec_scan, STACKED)],
                         ids=["loop", "scan"])
def test_rows(f, params):
  fns = to_step(f, params, SRC, TGT, rows=True)
  check_steps(fns, f, (params, SRC), TGT, prefill_lengths=(0, 3))
  check_ragged(fns, f, (params, SRC), TGT)
  check_carry(fns, params, scan=f is encdec_scan, rows=True)
  check_step_program(fns, (params, SRC), per_layer=f is encdec)


def test_the_step_reads_no_source():
  """What the step computes from the source comes from the carry: another
  source given to step changes nothing (it is the carry's)."""
  fns = to_step(encdec, PARAMS, SRC, TGT)
  carry, _ = fns.prefill(PARAMS, SRC, TGT[:, :3])
  _, y = fns.step(PARAMS, SRC, carry, TGT[:, 3])
  _, y_other = fns.step(PARAMS, jnp.zeros_like(SRC), carry, TGT[:, 3])
  np.testing.assert_array_equal(y, y_other)


def test_parameters_alone_are_not_carried():
  """Weight normalisation is work on parameters alone: named as parameters
  (``param_argnums``, or with batch_axes the arguments without rows) it is
  recomputed, never carried (with rows it would be copied per row); the
  encoder's work on the source still is. Unnamed, the unscanned inputs
  count as data and the norms ``[1, F]`` are computed once (not the
  normalised weights ``[D, F]``: dividing by the norms is cheap, and they
  are smaller)."""
  fns = to_step(encdec_weight_norm, PARAMS, SRC, TGT, rows=True)
  check_ragged(fns, encdec_weight_norm, (PARAMS, SRC), TGT)
  assert not [x for x in carry_leaves(fns) if F in x.shape]
  check_carry(fns, PARAMS, rows=True)
  fns = to_step(encdec_weight_norm, PARAMS, SRC, TGT, param_argnums=0)
  check_steps(fns, encdec_weight_norm, (PARAMS, SRC), TGT, (0, 4))
  assert not [x for x in carry_leaves(fns) if F in x.shape]
  check_carry(fns, PARAMS)
  fns = to_step(encdec_weight_norm, PARAMS, SRC, TGT)
  check_steps(fns, encdec_weight_norm, (PARAMS, SRC), TGT, (0, 4))
  assert [x.shape for x in carry_leaves(fns) if F in x.shape] == [(1, F)] * 2


def test_param_argnums_must_name_unscanned_shared_arguments():
  with pytest.raises(ValueError, match="argument 2, which is scanned"):
    to_step(encdec, PARAMS, SRC, TGT, param_argnums=2)
  with pytest.raises(ValueError, match="argument 1, which has rows"):
    to_step(encdec, PARAMS, SRC, TGT, rows=True, param_argnums=(0, 1))
  with pytest.raises(ValueError, match="names argument 5; there are 3"):
    to_step(encdec, PARAMS, SRC, TGT, param_argnums=5)


@pytest.mark.parametrize("flag", [1, 0])
def test_nested_call_and_cond(flag):
  flag = jnp.int32(flag)
  fns = to_step(encdec_nested, PARAMS, SRC, flag, TGT)
  check_steps(fns, encdec_nested, (PARAMS, SRC, flag), TGT, (0, 4))
  jaxpr, carry_vars = step_jaxpr(fns, (PARAMS, SRC, flag))
  found = dots_over(jaxpr, carry_vars, S)
  # both branches of each layer's cond read carried keys and values
  assert found and all(found), found


# -- no full-length broadcast in a step ----------------------------------------
POS = random_like(jnp.zeros((L, D)), 3)


def decoder_only(params, tgt):
  """A decoder with full-length unscanned operands: a learned position
  table read with ``arange``, sinusoids from an iota, LayerNorm parameters
  and a mask broadcast to ``[B, H, L, L]``."""
  n = tgt.shape[1]
  position = jnp.arange(n)
  angles = position[:, None] / 100.0 ** (jnp.arange(D) / D)
  h = tgt + POS[position] + jnp.sin(angles)
  mask = jnp.broadcast_to(causal_mask(n), (tgt.shape[0], H, n, n))
  for p in params["decoder"]:
    a = layer_norm(p["norm_self"], h)
    h = h + attention(p["self"], a, a, mask)
    bias = jnp.broadcast_to(p["b_up"], h.shape[:-1] + (F,))
    h = h + jax.nn.relu(layer_norm(p["norm_mlp"], h) @ p["up"] + bias) @ (
        p["down"])
  return h


@pytest.mark.parametrize("rows", [False, True], ids=["uniform", "rows"])
def test_step_builds_no_full_length_broadcast(rows):
  fns = to_step(decoder_only, PARAMS, TGT, rows=rows)
  check_steps(fns, decoder_only, (PARAMS,), TGT, (0, 4))
  jaxpr, _ = step_jaxpr(fns, (PARAMS,))
  shapes = broadcasts_along(jaxpr, L)
  assert shapes   # the rows of the mask, along the keys
  for shape in shapes:
    assert shape.count(L) == 1 and shape[-1] == L, shape
  # the prefill builds them at full length, as the training mode does
  closed = jax.make_jaxpr(lambda p, x: fns.prefill(p, x))(PARAMS, TGT)
  assert any(s.count(L) == 2 for s in broadcasts_along(closed.jaxpr, L))
