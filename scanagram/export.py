"""``scanagram.export``: a derived step in one file, loadable without the model.

:func:`save` writes a step pair's ``init``, ``step``, ``run`` and prefills
(``jax.export`` serializations) with its parameters and what the loader
needs to know (``meta.json``); :func:`load` reads them back as an
:class:`ExportedPair`, whose functions run where neither the model's code
nor its library (Haiku, Flax...) is importable: JAX and NumPy suffice.
Serializing needs the ``flatbuffers`` package (the ``export`` extra).

The file is a zip archive:

* ``meta.json``: format and version, the time axis, L, the structures and
  specs of ``x``, ``y`` and the prefill's outputs, the parameter specs,
  which prefills were exported;
* ``<name>.jax``: ``Exported.serialize()`` of each function;
* ``params/<i>.bin``: the raw bytes of parameter leaf i (parameters stay
  inputs of the functions, not constants in them).

A file that is truncated, of another format, missing a member or whose
``meta.json`` disagrees with its functions is refused by :func:`load` with
a ``ValueError`` naming the file and what is wrong.
"""
import json
import math
import zipfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["save", "load", "ExportedPair"]

FORMAT = "scanagram-step"
VERSION = 1


# -- pytree structures as JSON -------------------------------------------------
_LEAF = object()


class _Malformed(Exception):
  """What is wrong with a file that is a zip archive (for load's message)."""


def _skeleton(tree_def):
  """A JSON description of a pytree structure of dicts, lists, tuples and
  None (jax.export cannot serialize dicts with non-string keys)."""
  def encode(node):
    if node is None:
      return {"none": True}
    if node is _LEAF:
      return {"leaf": True}
    if isinstance(node, dict):
      return {"dict": [[_encode_key(k), encode(v)] for k, v in node.items()]}
    if type(node) in (list, tuple):
      return {type(node).__name__: [encode(v) for v in node]}
    raise TypeError(f"export supports inputs and outputs made of dicts, "
                    f"lists, tuples and arrays; got a {type(node).__name__} "
                    f"node in {tree_def}")
  return encode(jax.tree.unflatten(tree_def, [_LEAF] * tree_def.num_leaves))


def _encode_key(k):
  if isinstance(k, bool) or not isinstance(k, (str, int)):
    raise TypeError(f"export supports dict keys that are str or int; got "
                    f"{k!r}")
  return {"str": k} if isinstance(k, str) else {"int": k}


def _structure(skeleton, entry):
  """The pytree structure :func:`_skeleton` described."""
  def decode(node):
    if not isinstance(node, dict) or len(node) != 1:
      raise _Malformed(f"meta.json entry {entry!r} has the node "
                       f"{_short(node)}, not a one-key object")
    (kind, value), = node.items()
    if kind in ("none", "leaf"):
      return None if kind == "none" else 0
    if kind in ("list", "tuple") and isinstance(value, list):
      children = [decode(v) for v in value]
      return children if kind == "list" else tuple(children)
    if kind == "dict" and isinstance(value, list):
      return {_decode_key(item, entry): decode(item[1]) for item in value}
    raise _Malformed(f"meta.json entry {entry!r} has the node "
                     f"{_short(node)} of unknown kind")
  return jax.tree.structure(decode(skeleton))


def _decode_key(item, entry):
  if (isinstance(item, list) and len(item) == 2 and isinstance(item[0], dict)
      and len(item[0]) == 1):
    (kind, key), = item[0].items()
    if (kind == "str" and isinstance(key, str)) or (kind == "int" and
                                                    _is_int(key)):
      return key
  raise _Malformed(f"meta.json entry {entry!r} has the dict item "
                   f"{_short(item)}, not [key, node]")


def _short(value):
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v, minimum=None):
  return (isinstance(v, int) and not isinstance(v, bool) and
          (minimum is None or v >= minimum))


def _spec_json(spec):
  return {"shape": [int(d) for d in spec.shape],
          "dtype": jnp.dtype(spec.dtype).name}


def _spec_from_json(d, entry):
  if not (isinstance(d, dict) and isinstance(d.get("shape"), list) and
          all(_is_int(n, 0) for n in d["shape"]) and
          isinstance(d.get("dtype"), str)):
    raise _Malformed(f"meta.json entry {entry!r} is {_short(d)}, not "
                     "{'shape': [sizes], 'dtype': name}")
  try:
    dtype = jnp.dtype(d["dtype"])
  except (TypeError, ValueError):
    raise _Malformed(f"meta.json entry {entry!r} has the unknown dtype "
                     f"{d['dtype']!r}") from None
  return jax.ShapeDtypeStruct(tuple(d["shape"]), dtype)


def _with_time(spec, axis, n):
  shape = list(spec.shape)
  shape.insert(axis % (len(shape) + 1), n)
  return jax.ShapeDtypeStruct(tuple(shape), spec.dtype)


# -- save ----------------------------------------------------------------------
def save(pair, params, path, *, state=None, prompt_lengths=(),
         platforms: Optional[Sequence[str]] = None):
  """Writes a pair's init, step, run and prefills, with its parameters, to
  one file.

  The functions, as ``jax.export`` serializations, take and return flat
  lists of arrays (the carry is opaque to the loader):

  * ``init(params) -> carry``,
  * ``step(params, carry, x) -> (carry, y)``,
  * ``run(params, carry, xs) -> (carry, ys)``: a ``lax.scan`` of steps over a
    symbolic number of elements along ``axis``,
  * ``prefill(params, prompt) -> (carry, out)``: one with a symbolic prompt
    length when the pair's prefill is shape-polymorphic, else one per length
    in ``prompt_lengths`` (the usual case today: the conversion compares the
    prompt length with L in Python). A prompt of length 0 is served by
    ``init``.

  Args:
    pair: a step pair (``to_step`` of an adapter, e.g.
      :func:`adapters.haiku.to_step`): ``axis``, ``length``,
      ``element_spec``, ``init``, ``prefill``, ``step``.
    params: its parameters (arrays); state: its model state, if it has one.
    path: the file to write.
    prompt_lengths: the prompt lengths to serve when the prefill cannot be
      exported with a symbolic length.
    platforms: ``jax.export`` lowering platforms (default: JAX's default
      backend), e.g. ``("cpu", "cuda")``.

  Returns:
    ``path``.
  """
  has_state = bool(getattr(pair, "has_state", False))
  if has_state and state is None:
    raise TypeError("this pair's model has state: pass state=")
  if not has_state and state is not None:
    raise TypeError("this pair's model has no state: drop state=")
  element = getattr(pair, "element_spec", None)
  if element is None:
    raise TypeError(f"{type(pair).__name__} has no element_spec: save takes "
                    "a step pair (to_step of an adapter)")
  unscanned = (params, state) if has_state else (params,)
  _check_readable(unscanned)
  # sharded parameters are gathered: the file holds each one whole
  u_leaves, u_def = jax.tree.flatten(jax.tree.map(
      lambda x: jnp.asarray(np.asarray(x)), unscanned))
  x_leaves, x_def = jax.tree.flatten(element)
  axis, length = pair.axis, int(pair.length)
  options = {} if platforms is None else {"platforms": tuple(platforms)}

  def unpack(u):
    return jax.tree.unflatten(u_def, u)

  carry_spec = jax.eval_shape(lambda u: pair.init(*unpack(u)), u_leaves)
  carry_def = jax.tree.structure(carry_spec)

  def init(u):
    return jax.tree.leaves(pair.init(*unpack(u)))

  def step_tree(u, c, x):
    return pair.step(*unpack(u), jax.tree.unflatten(carry_def, c),
                     jax.tree.unflatten(x_def, x))

  def step(u, c, x):
    carry, y = step_tree(u, c, x)
    return jax.tree.leaves(carry), jax.tree.leaves(y)

  def run(u, c, xs):
    xs = [jnp.moveaxis(x, axis, 0) for x in xs]
    c, ys = lax.scan(lambda c, x: step(u, c, x), c, xs)
    return c, [jnp.moveaxis(y, 0, axis) for y in ys]

  def prefill_tree(u, prompt):
    return pair.prefill(*unpack(u), jax.tree.unflatten(x_def, prompt))

  def prefill(u, prompt):
    carry, out = prefill_tree(u, prompt)
    return jax.tree.leaves(carry), jax.tree.leaves(out)

  def export(fun, *specs):
    return jax.export.export(jax.jit(fun), **options)(*specs)

  u_specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in u_leaves]
  c_specs = jax.tree.leaves(carry_spec)
  y_def = jax.tree.structure(jax.eval_shape(
      lambda *a: step_tree(*a)[1], u_specs, c_specs, x_leaves))
  exported = {"init": export(init, u_specs),
              "step": export(step, u_specs, c_specs, x_leaves)}
  n, = jax.export.symbolic_shape("n")
  exported["run"] = export(run, u_specs, c_specs,
                           [_with_time(s, axis, n) for s in x_leaves])
  p, = jax.export.symbolic_shape("p", constraints=(f"p <= {length}",))
  prefill_info = {"symbolic": False, "lengths": []}
  try:
    exported["prefill"] = export(prefill, u_specs,
                                 [_with_time(s, axis, p) for s in x_leaves])
    prefill_info["symbolic"] = True
  except Exception as e:  # noqa: BLE001  (any failure to be polymorphic)
    prefill_info["why_not_symbolic"] = f"{type(e).__name__}: {e}"[:2000]
    for q in sorted(set(int(q) for q in prompt_lengths) - {0}):
      if not 0 < q <= length:
        raise ValueError(f"prompt_lengths: {q} is not in 0..L={length}")
      exported[f"prefill_{q}"] = export(
          prefill, u_specs, [_with_time(s, axis, q) for s in x_leaves])
      prefill_info["lengths"].append(q)
  # a prompt of length 0 has outputs of length 0: their specs at length 1
  out_specs = jax.eval_shape(lambda *a: prefill_tree(*a)[1], u_specs,
                             [_with_time(s, axis, 1) for s in x_leaves])
  out_leaves, out_def = jax.tree.flatten(out_specs)
  meta = {
      "format": FORMAT, "version": VERSION, "axis": axis,
      "length": length, "x_tree": _skeleton(x_def),
      "x_specs": [_spec_json(s) for s in x_leaves],
      "y_tree": _skeleton(y_def), "out_tree": _skeleton(out_def),
      "out_specs_at_1": [_spec_json(s) for s in out_leaves],
      "params": [_spec_json(s) for s in u_specs],
      "max_length": getattr(pair, "max_length", length),
      "prefill": prefill_info,
      "functions": sorted(exported),
  }
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
    z.writestr("meta.json", json.dumps(meta, indent=1))
    for name, exp in exported.items():
      z.writestr(f"{name}.jax", bytes(exp.serialize()))
    for i, x in enumerate(u_leaves):
      z.writestr(f"params/{i}.bin", np.asarray(x).tobytes())
  return path


def _check_readable(unscanned):
  """Refuses parameters this process cannot read whole (sharded across
  processes), naming the first."""
  flat, _ = jax.tree_util.tree_flatten_with_path(unscanned)
  for path, x in flat:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      raise ValueError(
          f"save: parameter {jax.tree_util.keystr(path)} is sharded across "
          "processes, and the file holds each parameter whole: gather it "
          "first (jax.experimental.multihost_utils.process_allgather), or "
          "save from parameters one process holds")


# -- load ----------------------------------------------------------------------
class ExportedPair:
  """A step pair read from a :func:`save` file, over deserialized
  ``jax.export`` functions: ``init``, ``prefill``, ``step``, ``run``.

  Its unscanned argument is the flat list of parameter (and state) arrays,
  its carry a flat list of arrays. It has no rows (``batch_axis`` is None).

  Attributes:
    axis, length (L), max_length (None: no limit on positions),
    element_spec: as on the pair it was saved from.
    params: the parameter arrays stored in the file.
    prefill_lengths: the prompt lengths the file serves: None for every
      length 0..L (symbolic export), else 0 and the exported ones.
    meta: the file's ``meta.json``.
  """

  has_state = False
  batch_axis = None

  def __init__(self, meta, functions, params):
    self.meta, self._fns, self.params = meta, functions, params
    self.axis, self.length = meta["axis"], meta["length"]
    self.max_length = meta["max_length"]
    self._x_def = _structure(meta["x_tree"], "x_tree")
    self._y_def = _structure(meta["y_tree"], "y_tree")
    self._out_def = _structure(meta["out_tree"], "out_tree")
    self.element_spec = jax.tree.unflatten(self._x_def, [
        _spec_from_json(s, "x_specs") for s in meta["x_specs"]])
    info = meta["prefill"]
    self.prefill_lengths = (None if info["symbolic"]
                            else [0] + list(info["lengths"]))

  def carry_spec(self):
    return list(self._fns["init"].out_avals)

  def init(self, params):
    return self._fns["init"].call(params)

  def step(self, params, carry, x):
    carry, y = self._fns["step"].call(params, carry,
                                      self._x_def.flatten_up_to(x))
    return carry, jax.tree.unflatten(self._y_def, y)

  def run(self, params, carry, xs):
    """Steps over ``xs`` (elements stacked along ``axis``) in one call."""
    carry, ys = self._fns["run"].call(params, carry,
                                      self._x_def.flatten_up_to(xs))
    return carry, jax.tree.unflatten(self._y_def, ys)

  def prefill(self, params, prompt):
    leaves = self._x_def.flatten_up_to(prompt)
    p = leaves[0].shape[self.axis % leaves[0].ndim]
    if p == 0:
      outs = []
      for s in self.meta["out_specs_at_1"]:
        shape = list(s["shape"])
        shape[self.axis % len(shape)] = 0
        outs.append(jnp.zeros(shape, s["dtype"]))
      return self.init(params), jax.tree.unflatten(self._out_def, outs)
    name = "prefill" if self.prefill_lengths is None else f"prefill_{p}"
    if name not in self._fns:
      raise ValueError(
          f"this exported step has prefills for prompt lengths "
          f"{self.prefill_lengths} only, got a prompt of length {p}: export "
          f"it with prompt_lengths=(..., {p}) (the prefill could not be "
          f"exported with a symbolic length: "
          f"{self.meta['prefill'].get('why_not_symbolic', '')[:200]})")
    carry, out = self._fns[name].call(params, leaves)
    return carry, jax.tree.unflatten(self._out_def, out)


def load(path) -> ExportedPair:
  """Reads a :func:`save` file.

  Raises:
    ValueError: the file is not a zip archive (truncated, another format),
      misses a member, has a corrupt member, or its ``meta.json`` is not
      what :func:`save` writes or disagrees with the functions; the message
      names the file and what is wrong.
  """
  try:
    with zipfile.ZipFile(path) as archive:
      return _read(archive)
  except zipfile.BadZipFile as e:
    what = f"it is not a zip archive (truncated, or another format): {e}"
  except _Malformed as e:
    what = str(e)
  raise ValueError(f"cannot load {path}: {what}; write it again with "
                   "scanagram.export.save")


def _read(archive) -> ExportedPair:
  def read(member):
    try:
      return archive.read(member)
    except KeyError:
      raise _Malformed(f"it has no member {member!r}") from None
    except (zipfile.BadZipFile, EOFError) as e:
      raise _Malformed(f"its member {member!r} is corrupt: {e}") from None

  try:
    meta = json.loads(read("meta.json"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _Malformed(f"meta.json is not JSON: {e}") from None
  found = ((meta.get("format"), meta.get("version"))
           if isinstance(meta, dict) else type(meta).__name__)
  if found != (FORMAT, VERSION):
    raise _Malformed(f"it is not a {FORMAT!r} file of version {VERSION} "
                     f"(meta.json has format and version {found})")
  specs = _check_meta(meta)

  functions = {}
  for name in meta["functions"]:
    try:
      functions[name] = jax.export.deserialize(bytearray(read(f"{name}.jax")))
    except _Malformed:
      raise
    except Exception as e:  # noqa: BLE001  (the deserializer's many errors)
      raise _Malformed(f"{name}.jax is not a jax.export serialization "
                       f"({type(e).__name__}: {e})") from None
  _check_functions(meta, functions, specs)

  params = []
  for i, spec in enumerate(specs["params"]):
    member = f"params/{i}.bin"
    data = read(member)
    size = math.prod(spec.shape) * spec.dtype.itemsize
    if len(data) != size:
      raise _Malformed(f"{member} holds {len(data)} bytes, but meta.json "
                       f"'params[{i}]' says {_avals([spec])[0]} ({size} bytes)")
    params.append(jnp.asarray(np.frombuffer(data, spec.dtype).reshape(
        spec.shape)))
  return ExportedPair(meta, functions, params)


_ENTRIES = {
    "axis": (_is_int, "an int"),
    "length": (lambda v: _is_int(v, 1), "an int >= 1"),
    "max_length": (lambda v: v is None or _is_int(v, 1),
                   "null or an int >= 1"),
    "functions": (lambda v: isinstance(v, list) and all(
        isinstance(f, str) for f in v), "a list of names"),
    "prefill": (lambda v: isinstance(v, dict) and isinstance(
        v.get("symbolic"), bool) and isinstance(v.get("lengths"), list),
                "{'symbolic': bool, 'lengths': [...]}"),
    **{key: (lambda v: isinstance(v, list), "a list")
       for key in ("x_specs", "out_specs_at_1", "params")},
    # the trees are checked as they are decoded
    **{key: (lambda v: True, "") for key in ("x_tree", "y_tree", "out_tree")},
}


def _check_meta(meta):
  """Checks that ``meta`` has the entries :func:`save` writes, well formed;
  returns the specs it lists, by entry."""
  for key, (ok, want) in _ENTRIES.items():
    if key not in meta:
      raise _Malformed(f"meta.json has no entry {key!r}")
    if not ok(meta[key]):
      raise _Malformed(f"meta.json entry {key!r} is {_short(meta[key])}, "
                       f"not {want}")
  length, lengths = meta["length"], meta["prefill"]["lengths"]
  if not all(_is_int(q, 1) and q <= length for q in lengths):
    raise _Malformed(f"meta.json entry 'prefill' has lengths {lengths}, not "
                     f"in 1..L={length}")
  needed = {"init", "step", "run"} | (
      {"prefill"} if meta["prefill"]["symbolic"] else
      {f"prefill_{q}" for q in lengths})
  missing = needed - set(meta["functions"])
  if missing:
    raise _Malformed(f"meta.json entry 'functions' lacks {sorted(missing)}")
  specs = {key: [_spec_from_json(s, f"{key}[{i}]")
                 for i, s in enumerate(meta[key])]
           for key in ("x_specs", "out_specs_at_1", "params")}
  for tree, key in (("x_tree", "x_specs"), ("out_tree", "out_specs_at_1")):
    leaves = _structure(meta[tree], tree).num_leaves
    if leaves != len(specs[key]):
      raise _Malformed(f"meta.json entry {tree!r} has {leaves} leaves but "
                       f"{key!r} {len(specs[key])} specs")
  _structure(meta["y_tree"], "y_tree")
  axis = meta["axis"]
  if not all(-len(s.shape) - 1 <= axis <= len(s.shape)
             for s in specs["x_specs"]):
    raise _Malformed(f"meta.json entry 'axis' is {axis}, not an axis of the "
                     "inputs")
  if any(not s.shape for s in specs["out_specs_at_1"]):
    raise _Malformed("meta.json entry 'out_specs_at_1' has a scalar, but "
                     "outputs have a time axis")
  return specs


def _check_functions(meta, functions, specs):
  """Checks that ``meta`` describes what the exported init and step take
  and return."""
  init, step = functions["init"], functions["step"]
  n_u, n_c = len(specs["params"]), len(init.out_avals)
  _compare("params", specs["params"], init.in_avals, "init")
  _compare("params", specs["params"], step.in_avals[:n_u], "step")
  _compare("x_specs", specs["x_specs"], step.in_avals[n_u + n_c:], "step")
  if _avals(init.out_avals) != _avals(step.in_avals[n_u:n_u + n_c]):
    raise _Malformed("the exported init and step disagree on the carry")
  y_leaves = _structure(meta["y_tree"], "y_tree").num_leaves
  if n_c + y_leaves != len(step.out_avals):
    raise _Malformed(f"meta.json entry 'y_tree' has {y_leaves} leaves, but "
                     f"the exported step returns "
                     f"{len(step.out_avals) - n_c}")


def _compare(entry, described, taken, function):
  described, taken = _avals(described), _avals(taken)
  if len(described) != len(taken):
    raise _Malformed(f"meta.json entry {entry!r} lists {len(described)} "
                     f"arrays, but the exported {function} takes "
                     f"{len(taken)}")
  for i, (d, t) in enumerate(zip(described, taken)):
    if d != t:
      raise _Malformed(f"meta.json entry '{entry}[{i}]' says {d}, but the "
                       f"exported {function} takes {t}")


def _avals(specs):
  return [f"{jnp.dtype(s.dtype).name}{list(s.shape)}" for s in specs]
