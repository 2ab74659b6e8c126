"""Prefill and step functions for Haiku models.

:func:`to_step` takes a model as Haiku users have it, ``hk.transform(forward)``
or ``hk.transform_with_state(forward)``, written for training on whole
sequences, and derives from it (through :func:`scanagram.to_step`) a
:class:`scanagram.StepPair`: ``init``, ``prefill``, ``extend``, ``step``,
compiled ``generate``, ``stream`` and ``beam_search`` loops, and ``bind`` for
a stateful :class:`scanagram.Stepper`. This module is only the Haiku glue:
``StepPair`` and ``Stepper`` live in :mod:`scanagram.stepping` (re-exported
here). Parameters and Haiku state are inputs of the compiled functions,
never constants baked into them, so one compilation serves every parameter
value of the same shapes.

With ``batch_axis`` (the axis of independent rows of ``xs``, e.g. 0 for
``[B, T, ...]``), every row keeps its own position: ``prefill``, ``extend``,
``generate`` and the :class:`Stepper` take per-row ``lengths`` for
right-padded prompts and blocks of different lengths.

Example:
  >>> import haiku as hk, jax, jax.numpy as jnp
  >>> from adapters.haiku import to_step
  >>> def forward(xs):                                  # xs: [B, T, D]
  ...   return jnp.cumsum(hk.Linear(2, with_bias=False)(xs), axis=1)
  >>> model = hk.transform(forward)
  >>> xs = jnp.ones((1, 6, 2))
  >>> params = {"linear": {"w": jnp.eye(2)}}
  >>> pair = to_step(model, xs, axis=1)       # converted at the first call
  >>> carry, out = pair.prefill(params, xs[:, :2])      # out: [1, 2, 2]
  >>> carry, y = pair.step(params, carry, xs[:, 2])     # y: [1, 2]
  >>> y.tolist()
  [[3.0, 3.0]]
"""
import inspect
import os
from typing import Optional

import haiku as hk
import jax

from scanagram import ScanConversionError, errors
from scanagram.stepping import StepPair, Stepper

__all__ = ["to_step", "StepPair", "Stepper"]


# -- the adapter ---------------------------------------------------------------
def to_step(model, example_xs, axis: Optional[int] = None, *,
            batch_axis: Optional[int] = None, params=None,
            state=None) -> "StepPair":
  """Derives a :class:`StepPair` from a Haiku model causal along ``axis``.

  Args:
    model: an ``hk.Transformed`` (``hk.transform``) or
      ``hk.TransformedWithState`` (``hk.transform_with_state``), with or
      without ``hk.without_apply_rng``, whose function takes ``xs`` and whose
      output ``[..., :t, ...]`` along ``axis`` depends only on the first t
      elements of ``xs``. A plain JAX function ``fun(params, xs)`` (or
      ``fun(params, state, xs)`` when ``state`` is given) is accepted too,
      with ``params`` required.
    example_xs: arrays or ``jax.ShapeDtypeStruct`` (a pytree) fixing the
      structure, shapes and dtypes of the input and its maximum length L along
      ``axis``.
    axis: the time axis of ``xs``, of prompts and of the outputs (1 for
      batch-major ``[B, T, ...]`` models). Default 0, with a warning when
      the example's axis 1 is longer (it looks batch-major).
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (0 for batch-major ``[B, T, ...]`` models, 1 for time-major
      ``[T, B, ...]`` ones), as ``jax.vmap``'s ``in_axes``/``out_axes``. With
      it every row has its own position: ``prefill``, ``extend`` and
      ``generate`` take per-row ``lengths``, the carry has the rows first on
      every leaf and ``positions(carry)`` is ``[B]``. A model that mixes rows
      (batch statistics, attention across the batch) is then refused.
    params, state: examples (arrays or ShapeDtypeStructs) of the parameters
      and state, to convert now. Without them the pair converts at its first
      call, from the shapes of the parameters (and state) it is given: a
      model whose ``init`` needs other arguments (``is_training=True`` to
      create BatchNorm's moving averages) needs no examples. Reading
      ``functions``, ``carry_spec()`` or ``max_length`` before that call runs
      ``model.init(rng, xs)`` abstractly to convert.

  Returns:
    A :class:`StepPair`. For ``transform_with_state`` models its functions
    take the state after the parameters; the state is read, not updated.

  Raises:
    ScanConversionError: (here, or at the first call without ``params``)
      the model is not causal along ``axis`` (the message names the
      operation, its source line and the Haiku module), or it asks for a
      random key at apply time (e.g. dropout without an inference flag).

  Example:
    >>> import haiku as hk, jax, jax.numpy as jnp
    >>> model = hk.transform(lambda ids: hk.Embed(5, 3)(ids))
    >>> ids = jnp.zeros((2, 8), jnp.int32)                # [B, T]
    >>> pair = to_step(model, ids, axis=1)
    >>> params = model.init(jax.random.key(0), ids)
    >>> pair.step(params, pair.init(params), ids[:, 0])[1].shape
    (2, 3)
    >>> rows = to_step(model, ids, axis=1, batch_axis=0)  # ragged prompts
    >>> carry, out = rows.prefill(params, ids[:, :3], lengths=[3, 1])
    >>> rows.positions(carry).tolist()
    [3, 1]
  """
  if isinstance(model, (hk.Transformed, hk.TransformedWithState)):
    has_state = isinstance(model, hk.TransformedWithState)
    fun = _apply_function(model, has_state)
    names = ("params", "state") if has_state else ("params",)
    if params is not None and (state is not None or not has_state):
      unscanned = (params, state) if has_state else (params,)
      return StepPair(fun, unscanned, example_xs, axis, has_state=has_state,
                      batch_axis=batch_axis, names=names)

    def examples():
      init_params, init_state = _init_shapes(model, example_xs, has_state)
      if not has_state:
        return (init_params if params is None else params,)
      return (init_params if params is None else params,
              init_state if state is None else state)
    # model.init is not run here: it may need arguments the inference path
    # lacks (BatchNorm's averages are made with is_training=True)
    return StepPair(fun, None, example_xs, axis, has_state=has_state,
                    batch_axis=batch_axis, num_unscanned=len(names),
                    names=names, example_unscanned=examples)
  if callable(model):
    if params is None:
      raise TypeError("to_step of a plain function fun(params, xs) needs "
                      "params= (an example of the parameters)")
    unscanned = (params,) if state is None else (params, state)
    return StepPair(model, unscanned, example_xs, axis,
                    has_state=state is not None, batch_axis=batch_axis,
                    names=("params", "state")[:len(unscanned)])
  raise TypeError(f"to_step expects an hk.Transformed or "
                  f"hk.TransformedWithState; got {type(model).__name__}")


def _init_shapes(model, example_xs, has_state):
  """The params (and state) shapes from ``model.init``, run abstractly."""
  try:
    out = jax.eval_shape(model.init, jax.random.key(0), example_xs)
  except Exception as e:
    raise TypeError(
        f"could not infer the parameter shapes by calling model.init(rng, xs) "
        f"({type(e).__name__}: {e}); pass them as to_step(..., params=..."
        f"{', state=...' if has_state else ''})") from e
  return out if has_state else (out, None)


def _apply_function(model, has_state):
  """``fun(params[, state], xs)``: the model's outputs, no rng, state read."""
  takes_rng = _apply_takes_rng(model.apply, has_state)

  def fun(*args):
    *unscanned, xs = args
    rng = (None,) if takes_rng else ()
    try:
      out = model.apply(*unscanned, *rng, xs)
    except ValueError as e:
      if type(e).__name__ != "MissingRNGError":
        raise
      raise _needs_rng_error(e) from e
    return out[0] if has_state else out
  return fun


def _apply_takes_rng(apply, has_state):
  try:
    names = list(inspect.signature(apply).parameters)
  except (TypeError, ValueError):
    return True
  position = 2 if has_state else 1
  return len(names) <= position or names[position] == "rng"


def _needs_rng_error(error):
  """A ScanConversionError naming the Haiku module that asked for a key."""
  module, where = None, None
  tb = error.__traceback__
  while tb is not None:
    frame = tb.tb_frame
    owner = frame.f_locals.get("self")
    if isinstance(owner, hk.Module):
      module = owner.module_name
    if not errors.is_library_file(frame.f_code.co_filename):
      where = f"{frame.f_code.co_filename}:{tb.tb_lineno}"
    tb = tb.tb_next
  who = f"Haiku module '{module}'" if module else "the model"
  at = f" (at {where})" if where else ""
  return ScanConversionError(
      f"{who} asks for a random key at apply time{at} (hk.next_rng_key, "
      "e.g. dropout); the derived step runs without one: make the inference "
      "path deterministic (e.g. an is_training=False flag that skips dropout)")


errors.register_library_path(os.path.dirname(os.path.abspath(__file__))
                             + os.sep)
