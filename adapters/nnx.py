"""Prefill and step functions for Flax NNX models.

:func:`to_step` takes an ``nnx.Module`` written for training on whole
sequences and derives from it a :class:`scanagram.StepPair`: ``init``,
``prefill``, ``extend``, ``step``, compiled ``generate``, ``stream`` and
``beam_search`` loops, and ``bind`` for a stateful :class:`scanagram.Stepper`
(``StepPair`` and ``Stepper`` live in :mod:`scanagram.stepping`).

The model is split as NNX's functional API does: its graph (modules, static
attributes such as ``deterministic``) is fixed by the model given to
:func:`to_step`, and its state is the unscanned input of the compiled
functions, so one compilation serves every value of the same shapes.
``pair.bind(model)`` splits the model it is given; the functional form takes
the state, :func:`state` (``nnx.state(model)`` for a model that keeps no
random streams):

* ``pair.bind(model)``: a :class:`Stepper` holding the model's state;
* ``pair.prefill(state(model), prompt)``, ``pair.step(state(model), carry,
  x)``, ``pair.generate(state(model), prompt, steps, sample)``, ...

The state is read, never updated: convert the model in inference mode
(``model.eval()``); one that updates its variables when called (BatchNorm
statistics, a dropout's random stream) is refused.

Example:
  >>> from flax import nnx
  >>> import jax.numpy as jnp
  >>> from scanagram.adapters.nnx import to_step
  >>> class Model(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(2, 2, use_bias=False, rngs=rngs)
  ...   def __call__(self, xs):                         # xs: [B, T, 2]
  ...     return jnp.cumsum(self.linear(xs), axis=1)
  >>> model = Model(nnx.Rngs(0))
  >>> model.linear.kernel[...] = jnp.eye(2)
  >>> xs = jnp.ones((1, 6, 2))
  >>> pair = to_step(model, xs, axis=1)         # converted at the first call
  >>> carry, out = pair.prefill(nnx.state(model), xs[:, :2])
  >>> carry, y = pair.step(nnx.state(model), carry, xs[:, 2])
  >>> y.tolist()
  [[3.0, 3.0]]
  >>> stepper = pair.bind(model)                # the stateful form
  >>> stepper.reset(xs[:, :2]).shape
  (1, 2, 2)
"""
from typing import Optional

import jax
from flax import nnx

from scanagram import ScanConversionError
from scanagram.stepping import StepPair, Stepper

from . import _errors

__all__ = ["to_step", "state", "StepPair", "Stepper"]

_STATE_HINT = ("pass scanagram.adapters.nnx.state(model), the model's state "
               "without its random streams (nnx.RngState)")


def state(model: nnx.Module) -> nnx.State:
  """The state a pair of ``model`` takes: ``nnx.state(model)`` without the
  random streams (``nnx.RngState``) that modules such as ``nnx.Dropout``
  keep. An inference step draws no random numbers, and key arrays cannot be
  inputs of the derived functions."""
  return nnx.state(model, nnx.Not(nnx.RngState))


def to_step(model: nnx.Module, example_xs, axis: Optional[int] = None, *,
            batch_axis: Optional[int] = None) -> StepPair:
  """Derives a :class:`StepPair` from an NNX model causal along ``axis``.

  ``graphdef, state = nnx.split(model)`` (the random streams kept apart)
  and ``fun(state, xs) = nnx.merge(graphdef, state)(xs)``: the functions
  take :func:`state` first.

  Args:
    model: an ``nnx.Module`` called as ``model(xs)``, whose output
      ``[..., :t, ...]`` along ``axis`` depends only on the first t elements
      of ``xs`` (attention under ``nnx.make_causal_mask``, RNNs, causal
      convolutions), in inference mode (``model.eval()``). The pair keeps its
      graph and static attributes as they are now; later changes to them
      (``model.train()``) do not reach the pair.
    example_xs: arrays or ``jax.ShapeDtypeStruct`` (a pytree) fixing the
      structure, shapes and dtypes of the input and its maximum length L
      along ``axis``.
    axis: the time axis of ``xs``, of prompts and of the outputs (1 for
      batch-major ``[B, T, ...]`` models). Default 0, with a warning when
      the example's axis 1 is longer (it looks batch-major).
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (0 for ``[B, T, ...]``): then every row has its own position
      and ``prefill``, ``extend``, ``generate`` take per-row ``lengths``.

  Returns:
    A :class:`StepPair`. ``pair.bind(model)`` (or ``pair.bind(state)``)
    gives a :class:`Stepper`; a model of another graph is refused there.
    ``functions``, ``carry_spec()`` and ``max_length`` may be read before the
    first call (they convert from the shapes of ``model``'s state).

  Raises:
    TypeError: ``model`` is not an NNX module.
    ScanConversionError: (at the first call) the model is not causal along
      ``axis`` (the message names the operation and its source line), or it
      updates its variables when called (training mode).

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> model = nnx.Sequential(nnx.Embed(5, 3, rngs=nnx.Rngs(0)),
    ...                        nnx.Dropout(0.1, rngs=nnx.Rngs(1)))
    >>> model.eval()                      # Dropout: deterministic
    >>> ids = jnp.zeros((2, 8), jnp.int32)                # [B, T]
    >>> pair = to_step(model, ids, axis=1, batch_axis=0)
    >>> carry, out = pair.prefill(state(model), ids[:, :3], lengths=[3, 1])
    >>> pair.positions(carry).tolist()
    [3, 1]
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"to_step expects an nnx.Module; got "
                    f"{type(model).__name__} (for linen use "
                    "scanagram.adapters.flax.to_step)")
  graphdef, rngs, example = nnx.split(model, nnx.RngState, ...)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       example)

  def fun(state, xs):
    _errors.check_like(state, specs, "state", _STATE_HINT)
    # copies: a use of the random streams changes this call's own variables
    # (which the check below sees), not the model's
    merged = nnx.merge(graphdef, rngs, state, copy=True)
    before = _values(merged)
    out = merged(xs)
    _check_unchanged(merged, before)
    return out

  def unscanned_from(model_or_state):
    if not isinstance(model_or_state, nnx.Module):
      return (model_or_state,)
    other, _, given = nnx.split(model_or_state, nnx.RngState, ...)
    if other != graphdef:
      raise TypeError(
          "bind: the model's graph (its modules, their static attributes "
          "such as deterministic, its variables' names) differs from the "
          "one this pair was converted with; convert a pair for it: "
          "to_step(model, ...)")
    return (given,)

  return StepPair(fun, None, example_xs, axis, batch_axis=batch_axis,
                  num_unscanned=1, names=("state",),
                  unscanned_from=unscanned_from,
                  example_unscanned=lambda: (specs,))


def _values(model):
  """``{path: value}`` of the model's variables; ``nnx.Intermediate`` ones
  (``sow``: outputs kept for inspection) are left out, a step may make
  them."""
  return {path: var.get_value() for path, var in
          nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Intermediate)))}


def _check_unchanged(model, before):
  """A ScanConversionError if calling ``model`` made or updated a
  variable."""
  after = _values(model)
  changed = [path for path, value in after.items()
             if before.get(path) is not value]
  if changed:
    names = ", ".join(_describe(model, path) for path in changed[:4])
    more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
    raise ScanConversionError(
        f"the model updates its variables when called: {names}{more}; the "
        "derived step reads the state, it cannot update it: convert the "
        "model in inference mode (model.eval(): Dropout deterministic, "
        "BatchNorm with use_running_average=True; no decode cache)")


def _describe(model, path):
  """``'a/b/mean' (BatchNorm)``: a variable's path and the module holding
  it."""
  owner, node = type(model).__name__, model
  for key in path[:-1]:
    try:
      node = node[key] if isinstance(key, int) else getattr(node, key)
    except (AttributeError, IndexError, KeyError, TypeError):
      break
    if isinstance(node, nnx.Module):
      owner = type(node).__name__
  return f"'{'/'.join(map(str, path))}' ({owner})"
