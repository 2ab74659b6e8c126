"""Prefill and step functions for Equinox models.

:func:`to_step` takes an ``eqx.Module`` written for training on whole
sequences and derives from it a :class:`scanagram.StepPair`: ``init``,
``prefill``, ``extend``, ``step``, compiled ``generate``, ``stream`` and
``beam_search`` loops, and ``bind`` for a stateful :class:`scanagram.Stepper`
(``StepPair`` and ``Stepper`` live in :mod:`scanagram.stepping`).

The model is split as Equinox's filtered transformations do: ``params,
static = eqx.partition(model, eqx.is_array)``. ``static`` (the non-array
fields: activation functions, sizes, flags) is fixed by the model given to
:func:`to_step`; ``params``, the array leaves, is the unscanned input of the
compiled functions, so one compilation serves every value of the same shapes:

* ``pair.bind(model)``: a :class:`Stepper` holding the model's arrays;
* ``pair.prefill(params, prompt)``, ``pair.step(params, carry, x)``,
  ``pair.generate(params, prompt, steps, sample)``, ... with ``params =
  eqx.filter(model, eqx.is_array)``.

Equinox models usually take one sequence (``[T, ...]``) and leave the batch
to ``jax.vmap``: ``to_step(model, xs)`` serves one sequence, and
``to_step(model, xs, batched=True)`` serves rows, ``xs`` being ``[B, T,
...]``: the model is vmapped over the rows, each with its own position
(``batch_axis=0``, ``axis=1``).

Example:
  >>> import equinox as eqx, jax, jax.numpy as jnp
  >>> from scanagram.adapters.equinox import to_step
  >>> class Model(eqx.Module):
  ...   linear: eqx.nn.Linear
  ...   def __call__(self, xs):                         # xs: [T, 2]
  ...     return jnp.cumsum(jax.vmap(self.linear)(xs), axis=0)
  >>> model = Model(eqx.nn.Linear(2, 2, use_bias=False, key=jax.random.key(0)))
  >>> model = eqx.tree_at(lambda m: m.linear.weight, model, jnp.eye(2))
  >>> xs = jnp.ones((6, 2))
  >>> pair = to_step(model, xs)                 # converted at the first call
  >>> stepper = pair.bind(model)
  >>> stepper.reset(xs[:2]).tolist()
  [[1.0, 1.0], [2.0, 2.0]]
  >>> stepper(xs[2]).tolist()
  [3.0, 3.0]
  >>> rows = to_step(model, jnp.ones((3, 6, 2)), batched=True)   # [B, T, 2]
  >>> params = eqx.filter(model, eqx.is_array)
  >>> carry, out = rows.prefill(params, jnp.ones((3, 4, 2)), lengths=[4, 1, 2])
  >>> rows.positions(carry).tolist()
  [4, 1, 2]
"""
from typing import Optional

import equinox as eqx
import jax

from scanagram import ScanConversionError
from scanagram.stepping import StepPair, Stepper

from . import _errors

__all__ = ["to_step", "StepPair", "Stepper"]


def to_step(model: eqx.Module, example_xs, axis: Optional[int] = None, *,
            batch_axis: Optional[int] = None,
            batched: bool = False) -> StepPair:
  """Derives a :class:`StepPair` from an Equinox model causal along ``axis``.

  ``params, static = eqx.partition(model, eqx.is_array)`` and ``fun(params,
  xs) = eqx.combine(params, static)(xs)`` (vmapped over the rows with
  ``batched``): the functions take ``params`` first.

  Args:
    model: an ``eqx.Module`` called as ``model(xs)``, whose output
      ``[..., :t, ...]`` along its time axis depends only on the first t
      elements of ``xs`` (attention under a causal mask, an RNN cell in
      ``lax.scan``, causal convolutions), in inference mode
      (``eqx.nn.inference_mode(model)`` when it has dropout).
    example_xs: arrays or ``jax.ShapeDtypeStruct`` (a pytree) fixing the
      structure, shapes and dtypes of the input (with the rows when
      ``batched``) and its maximum length L along ``axis``.
    axis: the time axis of ``xs``, of prompts and of the outputs. Default: 0,
      or 1 when ``batched`` with the rows first.
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs: then every row has its own position and ``prefill``,
      ``extend``, ``generate`` take per-row ``lengths``. Default: None, or 0
      when ``batched``.
    batched: the model takes one row: ``jax.vmap`` it over ``batch_axis`` of
      ``xs`` and of its outputs.

  Returns:
    A :class:`StepPair`. ``pair.bind(model)`` gives a :class:`Stepper`; a
    model whose non-array fields differ is refused there. ``functions``,
    ``carry_spec()`` and ``max_length`` may be read before the first call
    (they convert from the shapes of ``model``'s arrays).

  Raises:
    TypeError: ``model`` is not an Equinox module.
    ScanConversionError: (at the first call) the model is not causal along
      ``axis`` (the message names the operation and its source line), or it
      asks for a random key (dropout outside inference mode).
  """
  if not isinstance(model, eqx.Module):
    raise TypeError(f"to_step expects an eqx.Module; got "
                    f"{type(model).__name__}")
  params, static = eqx.partition(model, eqx.is_array)
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       params)
  if batched and batch_axis is None:
    batch_axis = 0
  if axis is None:
    axis = 1 if batched and batch_axis == 0 else 0

  def fun(params, xs):
    _errors.check_like(params, specs, "params",
                       "pass eqx.filter(model, eqx.is_array)")
    call = eqx.combine(params, static)
    if batched:
      call = jax.vmap(call, in_axes=batch_axis, out_axes=batch_axis)
    try:
      return call(xs)
    except RuntimeError as e:
      if "requires a key" not in str(e):
        raise
      raise ScanConversionError(
          f"{str(e).rstrip('.')}{_errors.at(e)}: the model asks for a random "
          "key (dropout); the derived step runs without one: convert it in "
          "inference mode, to_step(eqx.nn.inference_mode(model), ...)") from e

  def unscanned_from(model):
    given, given_static = eqx.partition(model, eqx.is_array)
    if eqx.tree_equal(given_static, static) is not True:
      raise TypeError(
          "bind: the model's non-array fields (its structure, activation "
          "functions, sizes, flags such as inference) differ from those of "
          "the model this pair was converted with. bind takes the model "
          "itself (the functional form takes eqx.filter(model, "
          "eqx.is_array)); for another model convert a pair: "
          "to_step(model, ...)")
    return (given,)

  return StepPair(fun, None, example_xs, axis, batch_axis=batch_axis,
                  num_unscanned=1, names=("params",),
                  unscanned_from=unscanned_from,
                  example_unscanned=lambda: (specs,))
