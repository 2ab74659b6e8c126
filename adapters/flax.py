"""Prefill and step functions for Flax linen modules.

:func:`to_step` takes an ``nn.Module`` written for training on whole
sequences and derives from it a :class:`scanagram.StepPair`: ``init``,
``prefill``, ``extend``, ``step``, compiled ``generate``, ``stream`` and
``beam_search`` loops, and ``bind`` for a stateful :class:`scanagram.Stepper`
(``StepPair`` and ``Stepper`` live in :mod:`scanagram.stepping`).

The unscanned input is ``variables``: the dict ``module.init`` returns, with
all its collections (``{"params": ..., "batch_stats": ...}``), as
``module.apply`` takes it. It is read, never updated, and it is an input of
the compiled functions, so one compilation serves every value of the same
shapes. The pair converts at its first call, from the shapes of the
variables it is given; ``module.init`` is not run for it.

Example:
  >>> import flax.linen as nn, jax.numpy as jnp
  >>> from scanagram.adapters.flax import to_step
  >>> class Model(nn.Module):
  ...   @nn.compact
  ...   def __call__(self, xs):                         # xs: [B, T, D]
  ...     return jnp.cumsum(nn.Dense(2, use_bias=False)(xs), axis=1)
  >>> xs = jnp.ones((1, 6, 2))
  >>> variables = {"params": {"Dense_0": {"kernel": jnp.eye(2)}}}
  >>> pair = to_step(Model(), xs, axis=1)       # converted at the first call
  >>> carry, out = pair.prefill(variables, xs[:, :2])   # out: [1, 2, 2]
  >>> carry, y = pair.step(variables, carry, xs[:, 2])  # y: [1, 2]
  >>> y.tolist()
  [[3.0, 3.0]]
"""
import functools
from typing import Optional

import flax.errors
import flax.linen as nn
import jax

from scanagram import ScanConversionError
from scanagram.stepping import StepPair, Stepper

from . import _errors

__all__ = ["to_step", "StepPair", "Stepper"]

_REFUSED_KWARGS = {
    "rngs": "the derived step runs without random keys; pass the module's "
            "inference flag instead (e.g. deterministic=True)",
    "mutable": "the derived step reads the variables and cannot return "
               "updated collections; pass the module's inference flag "
               "instead (e.g. train=False)",
}


def to_step(module: nn.Module, example_xs, axis: Optional[int] = None, *,
            batch_axis: Optional[int] = None, **apply_kwargs) -> StepPair:
  """Derives a :class:`StepPair` from a linen module causal along ``axis``.

  ``fun(variables, xs) = module.apply(variables, xs, **apply_kwargs)``
  becomes ``pair.prefill(variables, prompt)``, ``pair.step(variables,
  carry, x)``, ``pair.generate(variables, prompt, steps, sample)``, ...

  Args:
    module: an ``nn.Module`` whose ``__call__`` takes ``xs`` and whose output
      ``[..., :t, ...]`` along ``axis`` depends only on the first t elements
      of ``xs`` (attention under ``nn.make_causal_mask``, ``nn.RNN``, causal
      convolutions).
    example_xs: arrays or ``jax.ShapeDtypeStruct`` (a pytree) fixing the
      structure, shapes and dtypes of the input and its maximum length L
      along ``axis``.
    axis: the time axis of ``xs``, of prompts and of the outputs (1 for
      batch-major ``[B, T, ...]`` modules). Default 0, with a warning when
      the example's axis 1 is longer (it looks batch-major).
    batch_axis: None, or the axis of independent rows of ``xs`` and of the
      outputs (0 for ``[B, T, ...]``): then every row has its own position
      and ``prefill``, ``extend``, ``generate`` take per-row ``lengths``. A
      module that mixes rows (batch statistics in training mode) is then
      refused.
    **apply_kwargs: static keyword arguments of ``__call__`` selecting the
      inference path (``deterministic=True``, ``train=False``), or
      ``method=`` to apply another method; not ``rngs`` nor ``mutable``.

  Returns:
    A :class:`StepPair` whose functions take ``variables`` first. Reading
    ``functions``, ``carry_spec()`` or ``max_length`` before the first call
    runs ``module.init`` abstractly (with ``apply_kwargs``) to convert.

  Raises:
    TypeError: ``module`` is not a linen module, or ``rngs``/``mutable`` were
      given.
    ScanConversionError: (at the first call) the module is not causal along
      ``axis`` (the message names the operation and its source line), asks
      for a random key (dropout without ``deterministic=True``) or updates a
      variable (BatchNorm with ``use_running_average=False``).

  Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> class Model(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, ids, train: bool = True):      # ids: [B, T]
    ...     x = nn.Embed(5, 3)(ids)
    ...     return nn.BatchNorm(use_running_average=not train)(x)
    >>> ids = jnp.zeros((2, 8), jnp.int32)
    >>> variables = Model().init(jax.random.key(0), ids)   # params, batch_stats
    >>> pair = to_step(Model(), ids, axis=1, batch_axis=0, train=False)
    >>> carry, out = pair.prefill(variables, ids[:, :3], lengths=[3, 1])
    >>> pair.positions(carry).tolist()
    [3, 1]
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f"to_step expects a flax.linen Module; got "
                    f"{type(module).__name__} (for NNX use "
                    "scanagram.adapters.nnx.to_step)")
  for name, why in _REFUSED_KWARGS.items():
    if name in apply_kwargs:
      raise TypeError(f"to_step: {name}= is not supported: {why}")

  def fun(variables, xs):
    try:
      return module.apply(variables, xs, **apply_kwargs)
    except flax.errors.InvalidRngError as e:
      raise ScanConversionError(
          f"{_message(e)}{_errors.at(e)}: the module asks for a random key "
          "at apply time (e.g. dropout); the derived step runs without "
          "one: pass the inference flag of its __call__ to to_step (e.g. "
          "to_step(module, xs, deterministic=True)) or build it "
          "deterministic (nn.Dropout(..., deterministic=True))") from e
    except flax.errors.ModifyScopeVariableError as e:
      raise ScanConversionError(
          f"{_message(e)}{_errors.at(e)}: the module updates a variable at "
          "apply time (e.g. BatchNorm statistics in training mode); the "
          "derived step only reads the variables: pass the inference flag "
          "of its __call__ to to_step (e.g. to_step(module, xs, "
          "train=False)) or build it so (nn.BatchNorm("
          "use_running_average=True))") from e
    except flax.errors.ScopeCollectionNotFound as e:
      raise TypeError(
          f"{_message(e)}{_errors.at(e)}: pass the variables with every "
          "collection module.init returns (e.g. {'params': ..., "
          "'batch_stats': ...}). A variable the module makes at apply time "
          "(a decode cache) cannot be made by the derived step, which keeps "
          "its own cache: use the training-mode path (e.g. "
          "decode=False)") from e

  def example_variables():
    init = functools.partial(module.init, **apply_kwargs)
    return (jax.eval_shape(init, jax.random.key(0), example_xs),)

  return StepPair(fun, None, example_xs, axis, batch_axis=batch_axis,
                  num_unscanned=1, names=("variables",),
                  example_unscanned=example_variables)


def _message(error):
  """A Flax error's message without its link to the documentation."""
  return str(error).split(" (https://flax.readthedocs.io")[0].rstrip(".")
