"""Where values live on a mesh with explicit axes.

Under explicit mesh axes (``jax.make_mesh``'s default) a sharding is part
of an array's type: ``f32[4@data, 16, 32]``. Operands of one operation must
agree, so every array the conversion creates (a buffer, a queue, a running
state, an empty block) takes the placement of the value it will hold or
meet. Under automatic axes (or on one device) types carry no placement and
these helpers change nothing: XLA's partitioner places what we create.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def explicit_spec(x):
  """The explicit part of the ``PartitionSpec`` in ``x``'s type (an array, a
  tracer, a ShapeDtypeStruct, an aval or a sharding): its entries naming
  automatic mesh axes left out; None when it names no explicit axis."""
  sharding = _typed_sharding(x)
  if not isinstance(sharding, NamedSharding):
    return None
  explicit = set(getattr(sharding.mesh, "explicit_axes", ()))
  if not explicit:
    return None
  spec = [_only(entry, explicit) for entry in sharding.spec]
  if not any(spec):
    return None
  return PartitionSpec(*spec)


def _only(entry, axes):
  """A spec entry with the mesh axes not in ``axes`` left out."""
  if entry is None:
    return None
  names = entry if isinstance(entry, tuple) else (entry,)
  kept = tuple(a for a in names if a in axes)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def struct_of(x, dtype):
  """``x``'s ShapeDtypeStruct, keeping a sharding with explicit axes (the
  conversion traces under it, so ``reshard``\\s and typed broadcasts are
  in the jaxpr as the user's code would have them)."""
  sharding = _typed_sharding(x) if explicit_spec(x) is not None else None
  return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)


def resized(struct: jax.ShapeDtypeStruct, axis: int, size):
  """``struct`` with ``size`` elements along ``axis`` (None: the axis
  removed), its spec unsharded there."""
  shape = list(struct.shape)
  sharding = struct.sharding
  if size is None:
    del shape[axis]
  else:
    shape[axis] = size
  if isinstance(sharding, NamedSharding):
    spec = _padded(sharding.spec, len(struct.shape))
    if size is None:
      del spec[axis]
    else:
      spec[axis] = None
    sharding = sharding.update(spec=PartitionSpec(*spec))
  return jax.ShapeDtypeStruct(tuple(shape), struct.dtype, sharding=sharding)


def placed_like(shape, like, dim_of=None):
  """The sharding for a new array of ``shape`` that holds or meets ``like``:
  ``like``'s spec where ``dim_of`` maps a new dimension to one of ``like``'s
  of the same size (default: same rank, same sizes), unsharded elsewhere.
  None when ``like`` has no explicit placement."""
  spec = explicit_spec(like)
  if spec is None:
    return None
  like_shape = np.shape(like)
  spec = _padded(spec, len(like_shape))
  if dim_of is None:
    if len(shape) != len(like_shape):
      return None
    dim_of = range(len(shape))
  out = []
  for d, src in zip(range(len(shape)), dim_of):
    keep = src is not None and shape[d] == like_shape[src]
    out.append(spec[src] if keep else None)
  return NamedSharding(_typed_sharding(like).mesh, PartitionSpec(*out))


def full(shape, fill, dtype, like=None, dim_of=None):
  """``jnp.full`` placed like ``like`` (see :func:`placed_like`)."""
  sharding = None if like is None else placed_like(shape, like, dim_of)
  if sharding is None:
    return jnp.full(shape, fill, dtype)
  return jax.lax.full(shape, fill, dtype, sharding=sharding)


def zeros(shape, dtype, like=None, dim_of=None):
  """``jnp.zeros`` placed like ``like`` (see :func:`placed_like`)."""
  return full(shape, 0, dtype, like, dim_of)


def zeros_along(x, axis: int, size: int, dtype=None):
  """Zeros shaped like ``x`` but with ``size`` elements along ``axis``, placed
  like ``x`` and unsharded along ``axis`` (a queue or buffer of x's past)."""
  shape = list(np.shape(x))
  shape[axis] = size
  dim_of = [None if d == axis else d for d in range(len(shape))]
  return zeros(tuple(shape), dtype or x.dtype, like=x, dim_of=dim_of)


def like(x, ref):
  """``x`` resharded to ``ref``'s explicit placement where they differ (a
  mask or table built from constants meeting a sharded value)."""
  want = explicit_spec(ref)
  if want is None and explicit_spec(x) is None:
    return x
  target = placed_like(np.shape(x), ref)
  if target is None:
    target = NamedSharding(_typed_sharding(ref).mesh,
                           PartitionSpec(*[None] * np.ndim(x)))
  if _padded(explicit_spec(x) or (), np.ndim(x)) == list(target.spec) + [
      None] * (np.ndim(x) - len(target.spec)):
    return x
  return jax.sharding.reshard(x, target)


def conformed(traced_avals, invals):
  """``invals`` resharded to the explicit placements their equation was
  traced with, unsharded along dimensions whose size changed (a block or a
  step of the scanned axis, a buffer): the equation then typechecks as it
  did in the training mode. Going from replicated to split is a local
  slice, so a value this reshards costs no communication unless the trace
  asked for it."""
  out = []
  for aval, x in zip(traced_avals, invals):
    if getattr(aval, "shape", None) is None or np.ndim(x) != len(aval.shape):
      out.append(x)
      continue
    want = explicit_spec(aval)
    have = explicit_spec(x)
    if want is None and have is None:
      out.append(x)
      continue
    mesh = (_typed_sharding(aval) if want is not None
            else _typed_sharding(x)).mesh
    want = _padded(want or (), len(aval.shape))
    target = [w if n == m else None
              for w, n, m in zip(want, aval.shape, np.shape(x))]
    if _padded(have or (), np.ndim(x)) != target:
      x = jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*target)))
    out.append(x)
  return out


def fitted_params(eqn, params, invals):
  """``params`` with an explicit output sharding (``sharding``,
  ``out_sharding``, a reshard's ``dst_sharding``) left
  unsharded along dimensions whose size the conversion changed (the
  output's shape is that of a trial without it)."""
  keys = [k for k in ("sharding", "out_sharding", "dst_sharding")
          if explicit_spec(params.get(k)) is not None]
  if not keys:
    return params
  primitive = eqn.primitive
  plain = dict(params, **{k: params[k].update(spec=PartitionSpec())
                          for k in keys})
  shape = np.shape(jax.tree.leaves(jax.eval_shape(
      lambda *a: primitive.bind(*a, **primitive.get_bind_params(plain)),
      *invals))[0])
  traced = eqn.outvars[0].aval.shape
  if len(shape) != len(traced):
    return plain
  fitted = dict(params)
  for k in keys:
    spec = _padded(params[k].spec, len(shape))
    fitted[k] = params[k].update(spec=PartitionSpec(*[
        e if n == m else None for e, n, m in zip(spec, shape, traced)]))
  return fitted


def _typed_sharding(x):
  if isinstance(x, NamedSharding):
    return x
  if type(x).__name__ == "ShapedArray":   # (hasattr on a tracer is slow)
    return x.sharding
  if isinstance(x, jax.ShapeDtypeStruct):
    sharding = x.sharding
    if isinstance(sharding, NamedSharding):
      return sharding
    return None
  try:
    aval = jax.typeof(x)
  except TypeError:
    return None
  return getattr(aval, "sharding", None)


def _padded(spec, ndim):
  spec = list(spec)
  return spec + [None] * (ndim - len(spec))
