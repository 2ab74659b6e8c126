"""Drop-in replacements for JAX's neural-network functions whose fast
implementations the conversion cannot look into."""
import functools

import jax

from scanagram.by_reference import convert_as


def dot_product_attention(query, key, value, bias=None, mask=None, *,
                          implementation=None, **options):
  """``jax.nn.dot_product_attention``, converting as its XLA implementation.

  With ``implementation=None`` JAX picks cuDNN's fused kernel where cuDNN
  is available (a ``custom_call`` no rule can look into), and with
  ``"cudnn"`` always; either way this runs what JAX picks and the
  conversion derives the step of the ``"xla"`` implementation, after
  checking the two agree (:func:`scanagram.convert_as`). Arguments are
  ``jax.nn.dot_product_attention``'s.
  """
  xla = functools.partial(jax.nn.dot_product_attention,
                          implementation="xla", **options)
  if implementation == "xla":
    return xla(query, key, value, bias, mask)
  fast = functools.partial(jax.nn.dot_product_attention,
                           implementation=implementation, **options)
  # (cuDNN computes in lower precision than XLA's softmax)
  return convert_as(xla, rtol=2e-2, atol=2e-2)(fast)(query, key, value,
                                                     bias, mask)
