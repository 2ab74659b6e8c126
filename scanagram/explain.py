"""``scanagram.explain``: how a function converts, equation by equation.

The first thing to run when a carry is bigger than expected or a conversion
is refused: the traced jaxpr with each variable's kind (scanned along an
axis, unscanned, attention scores...) and, under each equation that keeps
state, its carry entries (name, shape, bytes, what they hold, the user's
source line). A refused conversion shows the kinds up to the refused
equation, marked, and the refusal.
"""
import re
import sys
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from scanagram import _jax_internals, api
from scanagram.errors import ScanConversionError, user_source_line
from scanagram.kinds import UNSCANNED, WHOLE_SEQUENCE, History, Scanned

# what the state of an equation holds, by primitive
_HOLDS = {
    "cumsum": "the running sum", "cumprod": "the running product",
    "cummax": "the running maximum", "cummin": "the running minimum",
    "cumlogsumexp": "the running log-sum-exp",
    "scan": "the scan's carry", "while": "the loop's state",
    "conv_general_dilated": "a ring of the last inputs of the convolution",
    "reduce_window_sum": "a ring of the last inputs of the window",
    "reduce_window_max": "a ring of the last inputs of the window",
    "reduce_window_min": "a ring of the last inputs of the window",
    "reduce_window": "a ring of the last inputs of the window",
    "custom_scanagram": "the state its step function defines",
    "associative_scan": "the running prefix of the associative scan",
    "cond": "the state of its branches",
}
_ENTRY = re.compile(r"^(\d+)_(\w+)$")   # a state entry: "<index>_<primitive>"
_PAST = re.compile(r"^past (\d+)$")


def explain(fun: Callable, *example_args, file=None, **options) -> str:
  """Prints how :func:`scanagram.to_step` converts ``fun`` and returns the
  text.

  Args:
    fun, *example_args, **options: as for :func:`scanagram.to_step`
      (``in_axes``, ``out_axes``, ``batch_axes``, ...).
    file: where to print (default ``sys.stdout``); ``False``: nowhere.

  The jaxpr is ``fun``'s on its flattened arguments (``args[i]...`` name
  each input); an equation that keeps state is followed by its carry
  entries. Nested jaxprs (a ``jit``, ``lax.scan`` or ``hk.remat`` body)
  appear through their entries' paths.
  """
  try:
    fns = api.to_step(fun, *example_args, **options)
  except ScanConversionError as err:
    text = _refused(err, example_args)
  else:
    text = _converted(fns, example_args)
  if file is not False:
    print(text, file=file or sys.stdout)
  return text


# -- a conversion ---------------------------------------------------------------
class CarryLeaf(NamedTuple):
  """One array of a carry, described so that a sharding can be written for
  it (:func:`describe_carry`)."""
  path: str                  # where it is in the carry: "['12_dot_general']"
  shape: Tuple[int, ...]
  dtype: Any
  holds: str                 # what it holds, in words
  source: Optional[str]      # the user's line that made its equation
  module: str                # the name stack there (a Haiku/Flax module path)
  time_axis: Optional[int]   # its axis along positions (a running value
  #                            keeps one there), None when it has none
  batch_axes: Tuple[int, ...]  # attention's kept-apart axes (batch, heads:
  #                              key/value heads under grouped queries)
  rows_axis: Optional[int]   # with per-row positions (batch_axes): 0


def describe_carry(fns) -> Dict:
  """The carry of ``fns`` (a :class:`scanagram.StepFunctions` or
  :class:`scanagram.StepPair`), its structure, with a :class:`CarryLeaf`
  per array: what it holds, which equation of the user's code keeps it,
  and its axes -- positions (``time_axis``: a buffer's length L, a ring's
  window, a queue's delay), the axes attention keeps apart (``batch_axes``:
  batch then heads, as the user's contraction lists them) and rows.

  Example:
    >>> import jax.numpy as jnp, scanagram
    >>> fns = scanagram.to_step(lambda xs: jnp.cumsum(xs, 0), jnp.ones((8, 2)))
    >>> leaf = jax.tree.leaves(describe_carry(fns),
    ...                        is_leaf=lambda x: isinstance(x, CarryLeaf))[0]
    >>> leaf.holds, leaf.shape, leaf.time_axis
    ('the running sum', (1, 2), 0)
  """
  fns = getattr(fns, "functions", fns)
  converted = fns._converted
  carry = fns.carry_spec()
  rows = None if fns.batch_axes is None else 0
  described = {}
  for index, (eqn, _, name) in enumerate(converted.entries):
    for v, key, _ in converted._plan.carried_by.get(index, ()):
      leaf = carry[key]
      described[key] = jax.tree.map(lambda x: CarryLeaf(
          f"[{key!r}]", tuple(x.shape), x.dtype,
          "computed once (by init or prefill) from unscanned data",
          user_source_line(eqn.source_info),
          _jax_internals.name_stack(eqn.source_info), None, (), rows), leaf)
    if name is not None and name in carry:
      flat, tree = jax.tree_util.tree_flatten_with_path(carry[name])
      leaves = []
      for (path, leaf), (_, where_eqn, holds, where) in zip(
          flat, _entries(eqn, carry[name], converted.kinds)):
        time_axis, batch_axes = _axes((where_eqn, eqn), leaf,
                                      converted.kinds, rows, path)
        leaves.append(CarryLeaf(
            f"[{name!r}]{jax.tree_util.keystr(path)}", tuple(leaf.shape),
            leaf.dtype, holds, where,
            _jax_internals.name_stack(where_eqn.source_info), time_axis,
            batch_axes, rows))
      described[name] = jax.tree.unflatten(tree, leaves)
  described["position"] = CarryLeaf(
      "['position']", tuple(carry["position"].shape),
      carry["position"].dtype, "the number of elements seen", None, "",
      None, (), rows)
  return described


def _axes(eqns, leaf, kinds, rows, path):
  """``(time_axis, batch_axes)`` of a state leaf kept by ``eqns`` (the
  equation that keeps it, then the one its entry is under): attention's
  buffer holds its scanned operand with the contraction's batch axes first;
  a past, ring or running value is shaped like a scanned operand but along
  time."""
  shift = 0 if rows is None else 1
  shape = tuple(leaf.shape[shift:])
  past = [int(m.group(1)) for key in path
          for m in [_PAST.match(str(getattr(key, "key", "")))] if m]
  for eqn in eqns:
    operands = ([eqn.invars[past[-1]]] if past and eqn is eqns[-1]
                else eqn.invars)
    if eqn.primitive.name == "dot_general" and not past:
      (_, batch) = eqn.params["dimension_numbers"]
      for i, v in enumerate(eqn.invars):
        kind = kinds.get(v)
        if not isinstance(kind, Scanned):
          continue
        perm = list(batch[i]) + [d for d in range(v.aval.ndim)
                                 if d not in batch[i]]
        stored = [v.aval.shape[d] for d in perm]
        time, kept = perm.index(kind.axis), len(batch[i])
        # grouped-query attention buffers the keys before their repeat over
        # heads: fewer heads (a divisor), the same layout
        if len(shape) == len(stored) and _same_but(
            shape[kept:], stored[kept:], time - kept) and all(
                m % n == 0 for n, m in zip(shape[:kept], stored[:kept])):
          return time + shift, tuple(d + shift for d in range(kept))
    for v in operands:
      kind = kinds.get(v)
      if isinstance(kind, Scanned) and _same_but(shape, v.aval.shape,
                                                 kind.axis):
        return kind.axis + shift, ()
  return None, ()


def _same_but(shape, other, axis) -> bool:
  return len(shape) == len(other) and all(
      n == m for d, (n, m) in enumerate(zip(shape, other)) if d != axis)


def _converted(fns: "api.StepFunctions", example_args) -> str:
  converted = fns._converted
  jaxpr = converted.jaxpr
  names = _Names(jaxpr, example_args)
  unscanned = [a for a, axis in zip(example_args, fns.in_axes) if axis is None]
  carry = jax.eval_shape(fns.init, *unscanned)
  lines = [_header(fns), "inputs"]
  lines += names.inputs(converted.kinds)
  lines.append("equations")
  carried_by = converted._plan.carried_by
  total = 0
  for index, (eqn, _, name) in enumerate(converted.entries):
    lines += names.equation(eqn, converted.kinds)
    for v, key, _ in carried_by.get(index, ()):
      entry = carry[key]
      total += _bytes(entry)
      lines.append(_carry_line(
          f"carry[{key!r}]", entry, f"{names[v]}, computed once (by init or "
          "prefill) from unscanned data and carried",
          user_source_line(eqn.source_info)))
    if name is not None and name in carry:
      for leaf, (path, _, holds, where) in zip(
          jax.tree.leaves(carry[name]),
          _entries(eqn, carry[name], converted.kinds)):
        total += _bytes(leaf)
        lines.append(_carry_line(f"carry[{name!r}]{path}", leaf, holds,
                                 where))
  outs = ", ".join(f"{names[v]} ({_kind(converted.kinds.get(v, UNSCANNED))})"
                   for v in jaxpr.outvars if not _is_literal(v))
  lines.append(f"outputs: {outs}")
  lines.append(f"carry: {_size(total)} in state entries, plus the position "
               f"{_shape(carry['position'])}; max_length: {fns.max_length}")
  return "\n".join(lines)


def _header(fns) -> str:
  fun = getattr(fns.fun, "__name__", repr(fns.fun))
  rows = "" if fns.batch_axes is None else f", batch_axes={fns.batch_axes}"
  return (f"scanagram.explain: {fun}, in_axes={fns.in_axes}, "
          f"L={fns.length}{rows}")


def _entries(eqn, state, kinds):
  """``(path, equation, what it holds, source line)`` for each array in one
  equation's state entry, in leaf order (the nested equation that keeps it
  and its line, else ``eqn``'s)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  for path, leaf in flat:
    where_eqn, holds = eqn, None
    for key in path:
      part = getattr(key, "key", getattr(key, "idx", None))
      if not isinstance(part, str):
        continue
      entry, past = _ENTRY.match(part), _PAST.match(part)
      if entry:
        inner = _sub_equation(where_eqn, int(entry.group(1)), entry.group(2))
        where_eqn = inner if inner is not None else where_eqn
        holds = None
      elif past:
        operand = where_eqn.invars[int(past.group(1))]
        holds = (f"the last {_past_length(leaf, operand)} elements of the "
                 f"value behind operand {past.group(1)}, read delayed "
                 "(one past per value, shared by its readers)")
    where = user_source_line(where_eqn.source_info) or \
        user_source_line(eqn.source_info)
    yield (jax.tree_util.keystr(path), where_eqn,
           holds or _holds(where_eqn, kinds if where_eqn is eqn else {}),
           where)


def _sub_equation(eqn, index: int, primitive: str):
  """Equation ``index`` of a sub-jaxpr of ``eqn`` with that primitive."""
  for body in _bodies(eqn):
    if index < len(body.eqns) and body.eqns[index].primitive.name == primitive:
      return body.eqns[index]
  return None


def _bodies(eqn):
  for value in eqn.params.values():
    for x in value if isinstance(value, (list, tuple)) else [value]:
      inner = getattr(x, "jaxpr", None)
      if inner is not None and hasattr(inner, "eqns"):
        yield inner
      elif hasattr(x, "eqns"):
        yield x


def _holds(eqn, kinds) -> str:
  """What the state of ``eqn`` holds (``kinds``: its jaxpr's, if known)."""
  name = eqn.primitive.name
  if name == "dot_general":
    scores = kinds.get(eqn.outvars[0])
    if isinstance(scores, History):
      where = (f"a ring of the last {scores.window} positions"
               if scores.window else "a buffer over every position")
      return f"the keys of q·kᵀ, {where}"
    weights = [kinds.get(v) for v in eqn.invars if not _is_literal(v)]
    window = [k.window for k in weights if isinstance(k, History)]
    if window:
      where = (f"a ring of the last {window[0]} positions"
               if window[0] else "a buffer over every position")
      return f"the values of weights·v, {where}"
    return "the keys or values of attention"
  if name in _HOLDS:
    return _HOLDS[name]
  if name in ("jit", "pjit", "closed_call", "remat", "checkpoint",
              "custom_jvp_call", "custom_vjp_call"):
    return "state of the call's body"
  return f"state of `{name}`"


def _past_length(leaf, operand) -> str:
  """The length along time of a past of ``operand``: where their shapes
  differ (a leading axis of rows left out)."""
  shape = leaf.shape[len(leaf.shape) - operand.aval.ndim:]
  differ = [n for n, m in zip(shape, operand.aval.shape) if n != m]
  return str(differ[0]) if differ else str(operand.aval.shape[0])


def _carry_line(name, leaf, holds, where=None) -> str:
  at = f"  ({where})" if where else ""
  return f"      {name}: {_shape(leaf)} {_size(_bytes(leaf))}: {holds}{at}"


# -- a refusal -----------------------------------------------------------------
def _refused(err: ScanConversionError, example_args) -> str:
  lines = ["scanagram.explain: refused"]
  partial = getattr(err, "partial", None)
  if partial is not None:
    jaxpr, kinds, refused = partial
    names = _Names(jaxpr, example_args)
    lines.append("inputs")
    lines += names.inputs(kinds)
    lines.append("equations (up to the refused one)")
    for eqn in jaxpr.eqns:
      if eqn is refused:
        lines += [f"{line}   <- refused" for line in
                  names.equation(eqn, kinds)[:1]]
        break
      lines += names.equation(eqn, kinds)
  lines.append(f"refused: {err}")
  return "\n".join(lines)


# -- formatting ----------------------------------------------------------------
class _Names:
  """Short names for a jaxpr's variables (inputs by their argument path)."""

  def __init__(self, jaxpr, example_args):
    self._names: Dict = {}
    self._inputs: List[str] = [
        "args" + jax.tree_util.keystr(path) for path, _ in
        jax.tree_util.tree_flatten_with_path(list(example_args))[0]]
    self._jaxpr = jaxpr
    for v in jaxpr.invars:
      self[v]

  def __getitem__(self, var) -> str:
    if _is_literal(var):
      return repr(np.asarray(var.val).item())
    if var not in self._names:
      self._names[var] = _letters(len(self._names))
    return self._names[var]

  def inputs(self, kinds) -> List[str]:
    return [f"  {self[v]:>4} {_shape(v.aval):<16} "
            f"{_kind(kinds.get(v, UNSCANNED)):<28} {label}"
            for v, label in zip(self._jaxpr.invars, self._inputs)]

  def equation(self, eqn, kinds) -> List[str]:
    ins = " ".join(self[v] for v in eqn.invars)
    where = user_source_line(eqn.source_info) or ""
    lines = []
    for j, v in enumerate(eqn.outvars):
      kind = _kind(kinds.get(v)) if v in kinds else "-"
      left = f"  {self[v]:>4} {_shape(v.aval):<16} {kind:<28}"
      lines.append(left + (f" = {eqn.primitive.name} {ins}   {where}"
                           if j == 0 else ""))
    return lines


def _letters(n: int) -> str:
  out = ""
  while True:
    out = chr(ord("a") + n % 26) + out
    n = n // 26 - 1
    if n < 0:
      return out


def _kind(kind) -> str:
  if kind is None or kind is UNSCANNED:
    return "unscanned"
  if kind is WHOLE_SEQUENCE:
    return "whole sequence"
  if isinstance(kind, Scanned):
    ahead = f", {kind.ahead} ahead" if kind.ahead else ""
    return f"scanned along {kind.axis}{ahead}"
  if isinstance(kind, History):
    window = f", window {kind.window}" if kind.window else ""
    return (f"scores (rows {kind.axis}, keys {kind.key_axis}{window}; "
            f"future {kind.future})")
  return str(kind)


def _shape(x) -> str:
  dtype = getattr(x, "dtype", None)
  short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16",
           "float64": "f64", "int32": "i32", "int64": "i64", "bool": "bool",
           "int8": "i8", "uint8": "u8", "uint32": "u32"}
  name = short.get(str(dtype), str(dtype))
  return f"{name}[{','.join(map(str, getattr(x, 'shape', ())))}]"


def _bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def _size(n: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if n < 1024 or unit == "MiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def _is_literal(v) -> bool:
  return hasattr(v, "val") and not hasattr(v, "suffix") and \
      type(v).__name__ == "Literal"
