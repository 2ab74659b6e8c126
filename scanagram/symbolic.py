"""Values known at conversion time, kept as functions of their indices.

A causal mask is an L×L array, but it is made from ``iota`` by a few
comparisons: ``i >= j``, ``i - j < w``. Scanagram keeps such a value as the
function of its indices it is, so a proof about it (which keys the mask
keeps for each query) costs O(L · atoms) instead of O(L²) time and memory:

* :class:`Affine`: an integer-valued ``c + Σ_d coef_d · index_d`` (``iota``
  and sums, differences, integer multiples of it; a range check keeps it
  exact in its dtype);
* :class:`Atom`: the boolean ``affine >= 0`` (every comparison of two affine
  values is one or two atoms);
* :class:`Const`: a concrete array kept compact: size 1 along every axis it
  is broadcast along (``jnp.ones((L, L))`` is one element);
* :class:`Node`: an elementwise primitive applied to such values (``and``,
  ``or``, ``not``, ``select_n``, ``convert_element_type``, ...).

Structural operations (``broadcast_in_dim``, ``transpose``, ``squeeze``,
``rev``, ``slice``, a ``reshape`` that adds or drops axes of size 1) move the
axes of the leaves and materialise nothing.

A value whose every leaf varying along the key axis is an :class:`Atom` is
constant between the atoms' thresholds: :func:`sweep` splits each row's keys
at those thresholds and gives one point per piece. Any other value (an
arbitrary constant array) is visited at every point, in blocks of bounded
size.
"""
import hashlib
import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core

# A concrete array built at conversion time (a value that is not kept as a
# function of its indices) has at most this many elements.
MAX_ELEMENTS = 1 << 24
# A check visits at most this many points (an arbitrary constant array
# along the keys is visited at every point).
MAX_POINTS = 1 << 28
# Points per block of a sweep: bounds the temporaries of a check.
_BLOCK_POINTS = 1 << 20
# Concrete operands folded into one concrete result at most this big.
_FOLD_ELEMENTS = 1 << 16
# Integer arrays at most this big are checked for being affine (an arange).
_AFFINE_CHECK_ELEMENTS = 1 << 20


class TooLarge(Exception):
  """A value or a check exceeds the limits of conversion time."""


class Unavailable:
  """A value that depends on no input of the function but that scanagram
  cannot know at conversion time; ``why`` says why (too large, side
  effects, failed to evaluate)."""

  def __init__(self, why: str):
    self.why = why

  def __array__(self, dtype=None, copy=None):
    raise TooLarge(self.why)

  def __getitem__(self, item):
    raise TooLarge(self.why)

  def __repr__(self):
    return f"Unavailable({self.why!r})"


# -- the values -----------------------------------------------------------------
class Lazy:
  """A value of ``shape`` and ``dtype`` defined by its indices."""
  shape: Tuple[int, ...]
  dtype: np.dtype
  _key = None
  _array = None

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def leaves(self):
    yield self

  def at(self, idx) -> np.ndarray:
    """The values at the points ``idx`` (one integer array per axis, all of
    one shape)."""
    raise NotImplementedError

  def varies(self, axis: int) -> bool:
    """Whether the value may differ along ``axis``."""
    return any(leaf._varies(axis) for leaf in self.leaves())

  @property
  def key(self):
    """Two values with equal keys are the same function of their indices
    (constant arrays compare by their bytes, or a 512-bit digest of them
    past 256 bytes); proofs are cached by it."""
    if self._key is None:
      self._key = self._make_key()
    return self._key

  def materialize(self, limit: Optional[int] = None) -> np.ndarray:
    """The concrete array: computed along the axes it varies along (at most
    ``limit`` elements), a broadcast view along the others."""
    if self._array is None:
      limit = MAX_ELEMENTS if limit is None else limit
      compact = tuple(n if self.varies(d) else 1
                      for d, n in enumerate(self.shape))
      count = math.prod(compact)
      if count > limit:
        raise TooLarge(
            f"a concrete array of {count} elements (shape {self.shape}), "
            f"more than the limit of {limit} elements scanagram evaluates "
            "at conversion time")
      idx = _open_grid(compact)
      values = np.asarray(self.at(idx), self.dtype).reshape(compact)
      self._array = np.broadcast_to(values, self.shape)
    return self._array

  def __array__(self, dtype=None, copy=None):
    out = self.materialize()
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, item):
    return np.asarray(self)[item]

  def __getattr__(self, name):
    # anything else a rule asks of an array (astype, reshape, tolist...)
    # it gets from the materialised array
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self.materialize(), name)

  def __repr__(self):
    return f"{type(self).__name__}{self.shape}"

  __hash__ = object.__hash__


def _delegate(op):
  def method(self, *args):
    return getattr(np.asarray(self), op)(*args)
  method.__name__ = op
  return method


# a rule may compare or compute with a known value as with an array
for _op in ("eq ne lt le gt ge add radd sub rsub mul rmul truediv rtruediv "
            "floordiv mod and rand or ror xor invert neg abs len iter "
            "float int").split():
  setattr(Lazy, f"__{_op}__", _delegate(f"__{_op}__"))
# a value is a value (``x or y`` on it picks it), not an array's truth
Lazy.__bool__ = lambda self: True


def _dtype_range(dtype):
  """The integers ``dtype`` holds exactly, or None."""
  dtype = np.dtype(dtype)
  if np.issubdtype(dtype, np.integer):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)
  if np.issubdtype(dtype, np.floating):
    # every integer up to 2^(mantissa + 1) is exact
    top = 2 ** (int(jax.numpy.finfo(dtype).nmant) + 1)
    return -top, top
  return None


class Affine(Lazy):
  """``const + Σ_d coefs[d] · index_d``: integer-valued, exact in its dtype
  (the constructor checks the range)."""

  def __init__(self, shape, dtype, const, coefs):
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.const = int(const)
    self.coefs = tuple(int(c) if n > 1 else 0 for c, n in zip(coefs, shape))

  def bounds(self):
    low = high = self.const
    for c, n in zip(self.coefs, self.shape):
      low += min(0, c * (n - 1))
      high += max(0, c * (n - 1))
    return low, high

  @classmethod
  def exact(cls, shape, dtype, const, coefs) -> Optional["Affine"]:
    """The affine value, or None when it leaves ``dtype``'s exact range
    (the array op would wrap or round; the caller keeps it a Node)."""
    value = cls(shape, dtype, const, coefs)
    exact = _dtype_range(dtype)
    if exact is None or 0 in value.shape:
      return None
    low, high = value.bounds()
    return value if exact[0] <= low and high <= exact[1] else None

  def linear(self, idx):
    out = self.const
    for c, ix in zip(self.coefs, idx):
      if c:
        out = out + c * ix.astype(np.int64)
    return np.broadcast_to(np.asarray(out, np.int64), _points_shape(idx))

  def at(self, idx):
    return self.linear(idx).astype(self.dtype)

  def _varies(self, axis):
    return self.coefs[axis] != 0

  def _make_key(self):
    return ("affine", self.shape, self.dtype.str, self.const, self.coefs)


class Atom(Affine):
  """The boolean ``const + Σ_d coefs[d] · index_d >= 0`` (exact integers)."""

  def __init__(self, shape, const, coefs):
    super().__init__(shape, np.bool_, const, coefs)

  def at(self, idx):
    return self.linear(idx) >= 0

  def threshold(self, axis, idx):
    """Per point (the other axes of ``idx``): the first index along
    ``axis`` where the atom's truth changes, or None when it cannot."""
    beta = self.coefs[axis]
    if beta == 0:
      return None
    rest = self.const
    for d, (c, ix) in enumerate(zip(self.coefs, idx)):
      if c and d != axis:
        rest = rest + c * ix.astype(np.int64)
    rest = np.asarray(rest, np.int64)
    if beta > 0:  # true from ceil(-rest / beta) on
      return -(rest // beta)
    return rest // -beta + 1  # true up to floor(rest / -beta)

  def _make_key(self):
    return ("atom", self.shape, self.const, self.coefs)


class Const(Lazy):
  """A concrete array, kept compact (size 1 along axes it is broadcast
  along)."""

  def __init__(self, shape, array):
    self.shape = tuple(shape)
    array = np.asarray(array)
    self.dtype = array.dtype
    array = array.reshape((1,) * (len(self.shape) - array.ndim) + array.shape)
    # drop broadcast axes (stride 0) and any axis of size 1 in the shape
    array = array[tuple(
        slice(0, 1) if a > 1 and (s == 0 or n == 1) else slice(None)
        for a, s, n in zip(array.shape, array.strides, self.shape))]
    self.array = array
    assert all(a in (1, n) for a, n in zip(array.shape, self.shape)), (
        array.shape, self.shape)

  @property
  def scalar(self) -> bool:
    return self.array.size == 1

  def at(self, idx):
    out = self.array[tuple(ix if a > 1 else 0
                           for ix, a in zip(idx, self.array.shape))]
    return np.broadcast_to(out, _points_shape(idx))

  def _varies(self, axis):
    return self.array.shape[axis] > 1

  def materialize(self, limit=None):
    return np.broadcast_to(self.array, self.shape)

  def _make_key(self):
    array = np.ascontiguousarray(self.array)
    digest = (array.tobytes() if array.nbytes <= 256 else
              hashlib.blake2b(array.view(np.uint8).reshape(-1),
                            digest_size=64).digest())
    return ("const", self.shape, array.dtype.str, array.shape, digest)


class Node(Lazy):
  """An elementwise primitive applied to lazy values of the same shape."""

  def __init__(self, primitive, params, children, dtype):
    self.primitive, self.params = primitive, dict(params)
    self.children = tuple(children)
    self.shape = self.children[0].shape
    self.dtype = np.dtype(dtype)

  def leaves(self):
    for c in self.children:
      yield from c.leaves()

  def at(self, idx):
    shape = _points_shape(idx)
    ins = [np.broadcast_to(c.at(idx), shape) for c in self.children]
    with jax.ensure_compile_time_eval():
      out = self.primitive.bind(
          *ins, **self.primitive.get_bind_params(self.params))
    return np.asarray(out)

  def _make_key(self):
    params = tuple(sorted((k, repr(v)) for k, v in self.params.items()))
    return ("node", self.primitive.name, params, self.shape, self.dtype.str,
            tuple(c.key for c in self.children))


def _open_grid(shape):
  """One int64 index array per axis, each along its own axis (they
  broadcast to ``shape``)."""
  return tuple(np.arange(n, dtype=np.int64).reshape(
      [-1 if e == d else 1 for e in range(len(shape))])
               for d, n in enumerate(shape))


def _points_shape(idx):
  return np.broadcast_shapes(*[np.shape(ix) for ix in idx]) if idx else ()


def _node_params(params):
  """Params for binding on points: no sharding of the full shape."""
  return {k: (None if k in ("sharding", "out_sharding") else v)
          for k, v in params.items()}


# -- lifting concrete values ----------------------------------------------------
def lift(value, shape, dtype=None) -> Lazy:
  """``value`` (a Lazy or a concrete array, broadcast numpy-style) as a Lazy
  of ``shape``. An integer array that is an affine function of its indices
  (``np.arange(L)[:, None]``) becomes an :class:`Affine`."""
  shape = tuple(shape)
  if isinstance(value, Lazy):
    if value.shape == shape:
      return value
    ndim = len(shape)
    return broadcast_in_dim(value, shape,
                            tuple(range(ndim - value.ndim, ndim)))
  array = np.asarray(value) if dtype is None else np.asarray(value, dtype)
  const = Const(np.broadcast_shapes(array.shape, shape), array)
  if const.shape != shape:  # broadcast_shapes would only grow it
    raise ValueError(f"cannot broadcast {array.shape} to {shape}")
  return _as_affine(const) or const


def _as_affine(const: Const) -> Optional[Affine]:
  """The Affine equal to an integer Const, or None."""
  a = const.array
  if not np.issubdtype(a.dtype, np.integer) or a.size <= 1 or \
      a.size > _AFFINE_CHECK_ELEMENTS:
    return None
  base = int(a.reshape(-1)[0])
  coefs = [int(a[tuple(1 if e == d else 0 for e in range(a.ndim))]) - base
           if a.shape[d] > 1 else 0 for d in range(a.ndim)]
  guess = Affine(const.shape, a.dtype, base, coefs)
  if not np.array_equal(guess.linear(_open_grid(a.shape)), a):
    return None
  return guess


# -- structure: move the axes of every leaf ------------------------------------
class _Axis(NamedTuple):
  """Old index ``offset + scale · new[axis]`` (``axis`` None: the old axis
  has size 1 or is dropped; its index is ``offset``)."""
  axis: Optional[int]
  scale: int = 1
  offset: int = 0


def _remap(value: Lazy, shape, axes) -> Lazy:
  """``value`` re-indexed: old axis d reads ``axes[d]`` of the new index."""
  shape = tuple(shape)
  if isinstance(value, Node):
    return Node(value.primitive, value.params,
                [_remap(c, shape, axes) for c in value.children], value.dtype)
  if isinstance(value, Affine):
    const, coefs = value.const, [0] * len(shape)
    for c, ax in zip(value.coefs, axes):
      const += c * ax.offset
      if ax.axis is not None:
        coefs[ax.axis] += c * ax.scale
    if isinstance(value, Atom):
      return Atom(shape, const, coefs)
    return Affine(shape, value.dtype, const, coefs)
  array = value.array
  for d, ax in enumerate(axes):
    if array.shape[d] == 1:
      continue
    if ax.axis is None:
      take = np.array([ax.offset])
    else:
      take = ax.offset + ax.scale * np.arange(shape[ax.axis])
      if ax.scale == 1 and ax.offset == 0 and len(take) == array.shape[d]:
        continue
    array = np.take(array, take, axis=d)
  # now old rank: each old axis holds 1 or the size of its new axis
  kept = [d for d in range(array.ndim)
          if array.shape[d] > 1 and axes[d].axis is not None]
  array = array.reshape([array.shape[d] for d in kept])
  kept_new = [axes[d].axis for d in kept]
  array = np.transpose(array, np.argsort(kept_new))
  new_shape = [1] * len(shape)
  for e in kept_new:
    new_shape[e] = shape[e]
  return Const(shape, array.reshape(new_shape))


def broadcast_in_dim(value, shape, dims):
  axes = [_Axis(dims[d] if n == shape[dims[d]] and n > 1 else None)
          for d, n in enumerate(value.shape)]
  return _remap(value, shape, axes)


def _structural(eqn, value: Lazy) -> Optional[Lazy]:
  """``eqn`` (a structural primitive) applied to ``value``, or None."""
  name, p = eqn.primitive.name, eqn.params
  shape = tuple(eqn.outvars[0].aval.shape)
  old = value.shape
  if name == "broadcast_in_dim":
    return broadcast_in_dim(value, shape, p["broadcast_dimensions"])
  if name == "transpose":
    perm = list(p["permutation"])
    return _remap(value, shape, [_Axis(perm.index(d)) for d in range(len(old))])
  if name == "squeeze":
    dims = [d % len(old) for d in p["dimensions"]]
    axes, e = [], 0
    for d in range(len(old)):
      if d in dims:
        axes.append(_Axis(None))
      else:
        axes.append(_Axis(e))
        e += 1
    return _remap(value, shape, axes)
  if name == "reshape":
    if p.get("dimensions") is not None:
      return None
    big_old = [d for d, n in enumerate(old) if n != 1]
    big_new = [d for d, n in enumerate(shape) if n != 1]
    if [old[d] for d in big_old] != [shape[d] for d in big_new]:
      return None  # merges or splits axes: not an affine re-indexing
    where = dict(zip(big_old, big_new))
    return _remap(value, shape, [_Axis(where.get(d)) for d in range(len(old))])
  if name == "rev":
    dims = set(p["dimensions"])
    return _remap(value, shape, [
        _Axis(d, -1, n - 1) if d in dims else _Axis(d)
        for d, n in enumerate(old)])
  if name == "slice":
    strides = p["strides"] or (1,) * len(old)
    return _remap(value, shape, [
        _Axis(d, s, st) for d, (s, st) in enumerate(zip(strides,
                                                         p["start_indices"]))])
  return None


_STRUCTURAL = frozenset(
    "broadcast_in_dim transpose squeeze reshape rev slice".split())


# -- elementwise: fold to affine values and atoms where exact -------------------
def _int_scalar(value) -> Optional[int]:
  """The integer a scalar Const holds, or None."""
  if isinstance(value, Const) and value.scalar:
    x = value.array.reshape(-1)[0]
    if np.issubdtype(value.dtype, np.integer):
      return int(x)
    if np.issubdtype(value.dtype, np.floating) and np.isfinite(x) and \
        float(x) == int(x):
      return int(x)
  return None


def _affine_of(value) -> Optional[Tuple[int, Tuple[int, ...]]]:
  """``(const, coefs)`` of an Affine or an integer-valued scalar Const."""
  if isinstance(value, Affine) and not isinstance(value, Atom):
    return value.const, value.coefs
  c = _int_scalar(value)
  if c is not None:
    return c, (0,) * value.ndim
  return None


def _combine(a, b, sa=1, sb=1):
  return (sa * a[0] + sb * b[0],
          tuple(sa * x + sb * y for x, y in zip(a[1], b[1])))


def _not(value):
  return Node(lax.not_p, {}, [value], np.bool_)


def _and(a, b):
  return Node(lax.and_p, {}, [a, b], np.bool_)


class _Overflow(Exception):
  """An atom whose coefficients int64 arithmetic cannot hold."""


def _atom(shape, const, coefs):
  """``const + Σ coefs·index >= 0``, its constant clamped to the range
  where the truth values do not change (a comparison with a huge constant
  is all true or all false)."""
  atom = Atom(shape, 0, coefs)
  low, high = atom.bounds()
  if max(abs(low), abs(high)) > 1 << 62:
    raise _Overflow
  return Atom(shape, min(max(const, -high - 1), -low), coefs)


def _compare(name, shape, a, b):
  """Comparison ``name`` of two affine forms (exact integers) as atoms."""
  if name == "ge":    # a - b >= 0
    return _atom(shape, *_combine(a, b, 1, -1))
  if name == "gt":    # a - b - 1 >= 0
    c, co = _combine(a, b, 1, -1)
    return _atom(shape, c - 1, co)
  if name == "le":
    return _compare("ge", shape, b, a)
  if name == "lt":
    return _compare("gt", shape, b, a)
  equal = _and(_compare("ge", shape, a, b), _compare("ge", shape, b, a))
  return equal if name == "eq" else _not(equal)


_FLIP = {"ge": "le", "gt": "lt", "le": "ge", "lt": "gt", "eq": "eq",
         "ne": "ne"}


def _compare_float(name, shape, affine, scalar):
  """``affine name scalar`` for a float scalar that is not an integer: the
  same comparison with the integer the affine values cannot cross."""
  if np.isnan(scalar):
    return Const(shape, np.array(name == "ne"))
  low, high = affine.bounds()
  x = min(max(scalar, low - 1), high + 1)  # keeps every comparison
  if name in ("eq", "ne"):
    if float(x) == math.floor(x):
      return _compare(name, shape, (affine.const, affine.coefs),
                      (int(x), (0,) * len(shape)))
    return Const(shape, np.array(name == "ne"))
  # a >= x  <=>  a >= ceil(x); a > x <=> a > floor(x); mirrors for <=, <
  bound = math.ceil(x) if name in ("ge", "lt") else math.floor(x)
  return _compare(name, shape, (affine.const, affine.coefs),
                  (bound, (0,) * len(shape)))


def _elementwise(eqn, ins) -> Lazy:
  name = eqn.primitive.name
  aval = eqn.outvars[0].aval
  shape, dtype = tuple(aval.shape), np.dtype(aval.dtype)
  forms = [_affine_of(x) for x in ins]
  # sums, differences, multiples of affine values stay affine when exact
  if all(f is not None for f in forms) and any(
      isinstance(x, Affine) for x in ins):
    out = None
    if name == "add":
      out = _combine(forms[0], forms[1])
    elif name == "sub":
      out = _combine(forms[0], forms[1], 1, -1)
    elif name == "neg":
      out = (-forms[0][0], tuple(-c for c in forms[0][1]))
    elif name == "mul":
      scalar = [i for i, x in enumerate(ins) if not isinstance(x, Affine)]
      if scalar:
        k = forms[scalar[0]][0]
        a = forms[1 - scalar[0]]
        out = (k * a[0], tuple(k * c for c in a[1]))
    elif name in ("copy", "stop_gradient", "reduce_precision",
                  "convert_element_type") and not dtype == np.bool_:
      out = forms[0]
    if out is not None:
      affine = Affine.exact(shape, dtype, *out)
      if affine is not None:
        return affine
    try:
      if name in _FLIP:
        return _compare(name, shape, forms[0], forms[1])
      if name == "convert_element_type" and dtype == np.bool_:
        return _compare("ne", shape, forms[0], (0, (0,) * len(shape)))
    except _Overflow:
      return Node(eqn.primitive, _node_params(eqn.params), ins, dtype)
  if name in _FLIP and len(ins) == 2:
    for i in (0, 1):  # an affine value against a float scalar
      a, s = ins[i], ins[1 - i]
      if isinstance(a, Affine) and not isinstance(a, Atom) and isinstance(
          s, Const) and s.scalar and np.issubdtype(s.dtype, np.floating):
        op = name if i == 0 else _FLIP[name]
        try:
          return _compare_float(op, shape, a, float(s.array.reshape(-1)[0]))
        except _Overflow:
          break
  # concrete operands: fold on their compact forms (broadcast axes dropped)
  if all(isinstance(x, Const) for x in ins):
    compact = np.broadcast_shapes(*[x.array.shape for x in ins])
    if math.prod(compact) <= _FOLD_ELEMENTS:
      arrays = [np.broadcast_to(x.array, compact) for x in ins]
      with jax.ensure_compile_time_eval():
        out = eqn.primitive.bind(*arrays, **eqn.primitive.get_bind_params(
            _node_params(eqn.params)))
      return Const(shape, np.asarray(out))
  return Node(eqn.primitive, _node_params(eqn.params), ins, dtype)


# -- evaluating equations ----------------------------------------------------------
_CALLS = frozenset("jit pjit closed_call core_call remat checkpoint "
                   "custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr"
                   .split())


def _call_body(eqn):
  if eqn.primitive.name not in _CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = eqn.params.get(key)
    if isinstance(body, jex_core.ClosedJaxpr):
      return body.jaxpr, body.consts
    if isinstance(body, jex_core.Jaxpr):
      return body, ()
  return None


def _bind(eqn, ins):
  p = eqn.primitive
  out = p.bind(*ins, **p.get_bind_params(eqn.params))
  return list(out) if p.multiple_results else [out]


def _shape_of(aval):
  return tuple(getattr(aval, "shape", ()))


def evaluate(eqn, ins, elementwise, limit=None):
  """``eqn``'s outputs from its known inputs ``ins`` (concrete arrays, Lazy
  or Unavailable values): Lazy where the equation keeps a function of the
  indices (``iota``, elementwise and structural primitives, calls to
  bodies made of those), else concrete (at most ``limit`` elements each)
  or Unavailable with the reason."""
  limit = MAX_ELEMENTS if limit is None else limit
  n = len(eqn.outvars)
  for x in ins:
    if isinstance(x, Unavailable):
      return [x] * n
  name = eqn.primitive.name
  out_avals = [v.aval for v in eqn.outvars]
  if name == "iota" and len(out_avals[0].shape) >= 1:
    p = eqn.params
    shape = tuple(p["shape"])
    coefs = [1 if d == p["dimension"] else 0 for d in range(len(shape))]
    out = Affine.exact(shape, p["dtype"], 0, coefs)
    if out is not None:
      return [out]
  body = _call_body(eqn)
  if body is not None:
    return evaluate_jaxpr(body[0], body[1], ins, elementwise, limit)
  if not eqn.primitive.multiple_results and len(_shape_of(out_avals[0])):
    shape = _shape_of(out_avals[0])
    if name in _STRUCTURAL and len(ins) == 1:
      out = _structural(eqn, lift(ins[0], _shape_of(eqn.invars[0].aval),
                                  eqn.invars[0].aval.dtype))
      if out is not None:
        return [_as_affine(out) or out if isinstance(out, Const) else out]
    elif eqn.primitive in elementwise and all(
        _broadcasts(_shape_of(v.aval), shape) for v in eqn.invars):
      lifted = [lift(x, shape, v.aval.dtype) for x, v in zip(ins, eqn.invars)]
      return [_elementwise(eqn, lifted)]
  return _concrete(eqn, ins, limit)


def _broadcasts(small, shape):
  """Whether an operand of shape ``small`` broadcasts to ``shape`` (a
  scalar, or size 1 along some axes of the same rank)."""
  return small == () or (len(small) == len(shape) and all(
      a in (1, n) for a, n in zip(small, shape)))


def _concrete(eqn, ins, limit):
  n = len(eqn.outvars)
  name = eqn.primitive.name
  for v in eqn.outvars:
    count = math.prod(_shape_of(v.aval))
    if count > limit:
      return [Unavailable(
          f"`{name}` would make a concrete array of {count} elements at "
          f"conversion time, more than the limit of {limit} "
          "(scanagram.interpreter._MAX_KNOWN_ELEMENTS)")] * n
  try:
    arrays = [x.materialize(limit) if isinstance(x, Lazy) else x for x in ins]
  except TooLarge as err:
    return [Unavailable(f"`{name}` needs {err} (its operand "
                        "is not kept symbolic)")] * n
  try:
    with jax.ensure_compile_time_eval():
      outs = _bind(eqn, arrays)
  except Exception as err:  # noqa: BLE001 - not evaluable eagerly
    return [Unavailable(f"evaluating `{name}` at conversion time failed "
                        f"({type(err).__name__}: {err})")] * n
  return [np.asarray(o) for o in outs]


def evaluate_jaxpr(jaxpr, consts, args, elementwise, limit=None):
  """The outputs of ``jaxpr`` on known ``args`` (None where unknown),
  evaluating only the equations they need."""
  env = dict(zip(jaxpr.constvars, [np.asarray(c) for c in consts]))
  env.update(zip(jaxpr.invars, args))
  needed = {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)}
  eqns = []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      eqns.append(eqn)
      needed.update(v for v in eqn.invars
                    if not isinstance(v, jex_core.Literal))
  for eqn in reversed(eqns):
    ins = [np.asarray(a.val) if isinstance(a, jex_core.Literal) else env[a]
           for a in eqn.invars]
    if any(x is None for x in ins):
      outs = [None] * len(eqn.outvars)
    elif eqn.effects:
      outs = [Unavailable(f"`{eqn.primitive.name}` has side effects")] * len(
          eqn.outvars)
    else:
      outs = evaluate(eqn, ins, elementwise, limit)
    env.update(zip(eqn.outvars, outs))
  return [np.asarray(v.val) if isinstance(v, jex_core.Literal) else env[v]
          for v in jaxpr.outvars]


# -- visiting a value piece by piece ---------------------------------------------
class Points(NamedTuple):
  """A block of a sweep: ``idx`` holds one int64 array of shape (R, P) per
  axis (R rows of the query axis, with the other axes, P points per row in
  key order); ``valid`` marks the points that start a nonempty piece.
  Every value swept is constant from a point to the next one of its row."""
  idx: Tuple[np.ndarray, ...]
  valid: np.ndarray


def sweep(shape, axis: int, key_axis: int, values, windows=(),
          block: int = _BLOCK_POINTS):
  """Visits every element of ``shape`` through one point per piece on
  which ``values`` (Lazy) are all constant: each row (one query ``i`` along
  ``axis``, with one index along each other axis the values vary along;
  index 0 along the axes they do not) splits its keys at every atom's
  threshold, at ``i + 1`` (the future keys) and at ``i - w + 1`` for each
  ``w`` in ``windows``. A value that varies along the keys other than
  through atoms is visited at every key. Raises TooLarge past MAX_POINTS."""
  shape = tuple(shape)
  ndim = len(shape)
  leaves = [leaf for v in values for leaf in v.leaves()]
  others = [d for d in range(ndim) if d not in (axis, key_axis) and
            shape[d] > 1 and any(leaf._varies(d) for leaf in leaves)]
  dense = any(leaf._varies(key_axis) and not isinstance(leaf, Atom)
              for leaf in leaves)
  atoms = {leaf.key: leaf for leaf in leaves
           if isinstance(leaf, Atom) and leaf._varies(key_axis)}
  atoms = list(atoms.values())
  nq, nk = shape[axis], shape[key_axis]
  combos = math.prod(shape[d] for d in others)
  width = nk if dense else 2 + len(windows) + len(atoms)
  total = combos * nq * width
  if total > MAX_POINTS:
    raise TooLarge(
        f"checking it visits {total} points (it varies along the keys "
        f"arbitrarily), more than the limit of {MAX_POINTS} "
        "(scanagram.symbolic.MAX_POINTS)")
  rows = combos * nq
  per_block = max(1, block // max(width, 1))
  for start in range(0, rows, per_block):
    r = np.arange(start, min(rows, start + per_block), dtype=np.int64)
    combo, i = np.divmod(r, nq)
    idx = [np.zeros_like(r) for _ in range(ndim)]
    idx[axis] = i
    if others:
      for d, ix in zip(others, np.unravel_index(
          combo, [shape[d] for d in others])):
        idx[d] = ix.astype(np.int64)
    if dense:
      keys = np.broadcast_to(np.arange(nk, dtype=np.int64), (len(r), nk))
      valid = np.ones(keys.shape, bool)
    else:
      cols = [np.zeros_like(r), i + 1] + [i - w + 1 for w in windows]
      cols += [a.threshold(key_axis, idx) for a in atoms]
      keys = np.sort(np.clip(np.stack(
          [np.broadcast_to(c, r.shape) for c in cols], 1), 0, nk), axis=1)
      ends = np.concatenate([keys[:, 1:], np.full((len(r), 1), nk)], 1)
      valid = keys < ends
    full = keys.shape
    points = tuple(keys if d == key_axis else
                   np.broadcast_to(idx[d][:, None], full) for d in range(ndim))
    yield Points(points, valid)


def first_index(idx, where) -> Optional[Tuple[int, ...]]:
  """The first point where ``where`` holds, in C order of the full array
  (what ``np.argwhere(...)[0]`` gives), or None."""
  pts = [np.asarray(ix)[where] for ix in idx]
  if not pts or not pts[0].size:
    return None
  keep = np.ones(pts[0].shape, bool)
  for p in pts:  # lexicographic: narrow axis by axis
    low = p[keep].min()
    keep &= p == low
  k = int(np.argmax(keep))
  return tuple(int(p[k]) for p in pts)


def scalar_value(value) -> Optional[Any]:
  """The one element of a value that is the same everywhere, or None."""
  if isinstance(value, Const) and value.scalar:
    return value.array.reshape(-1)[0]
  if isinstance(value, np.ndarray) and value.size and (
      value.ndim == 0 or all(s == 0 for s in value.strides)):
    return value.reshape(-1)[0]
  return None
