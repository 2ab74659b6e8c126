"""Attention: the key/value cache, derived and proven.

``q·kᵀ`` (a ``dot_general`` pairing every position of one sequence with every
position of another) is not causal by itself. Its rule keeps a buffer of the
keys (the operand as it enters the contraction) of length L and gives the
scores the kind ``History``: rows are scanned, the key axis holds all L
positions, and in a block the keys after the newest element differ from
the training mode (``future=TAINTED``). The rules here follow that record
through the graph:

* a ``select_n`` (``jnp.where``) whose mask is known at conversion time and
  picks the same constant at every future key of every row makes the scores
  exact (``future`` = that constant);
* adding a constant that is below ``NEG_THRESHOLD`` at every future key (an
  additive mask, ``logits + where(tril, 0, -1e9)``) makes them ``LOW``:
  large and negative in both modes, though not the same number, so only
  softmax's max and ``exp`` (which makes them exactly 0) may follow;
* elementwise ops carry the record: a large negative constant minus a finite
  row maximum stays large and negative (``NEG``), ``exp`` of it is exactly 0,
  0 times or over a finite value is 0;
* a reduction over the keys (softmax's max and sum) accepts only exact rows;
* the contraction of the weights with values over the key axis keeps a
  buffer of the values and accepts only weights that are exactly 0 at every
  future key, so the unfilled part of the buffer cannot reach the output.

Anything else on scores is refused. The assumption behind ``NEG``: masked
logits are filled with a value below ``NEG_THRESHOLD`` (-1e4) and the row's
largest logit is more than ~100 above it, so ``exp`` underflows to 0 exactly,
as it does in the training mode.

The package by concept: ``buffers`` (key/value buffers and rings),
``contractions`` (the two products), ``future`` (the record and its transfer
through elementwise ops), ``masks`` (proofs of masks and windows), ``scores``
(the rules for every other equation on scores).
"""
from scanagram.errors import ScanConversionError
from scanagram.kinds import History
from scanagram.rules.attention import contractions, scores  # noqa: F401  (registers)
from scanagram.rules.attention.contractions import is_attention_contraction
from scanagram.rules.attention.future import is_exact_history


def convert_with_facts(convert):
  """Converts, learning from each conversion what the next one needs:
  ``convert(context)`` records facts in ``context``.

  * A score product whose mask was refused is converted again with its
    operands' roles swapped (keys as the lhs, ``k·qᵀ``, as einops and named
    einsums emit it), with every product of the same shape and dimensions
    (the other layers); if that fails too, the first refusal stands.
  * A mask that proves a sliding window: converted again with rings of that
    size, checked again against the keys outside the window; full buffers
    when that second check fails.
  """
  facts, first_error = {}, None
  while True:
    context = dict(facts)
    try:
      converted = convert(context)
      break
    except ScanConversionError as err:
      first_error = first_error or err
      swapped = _keys_first(context) | facts.get("keys_first", frozenset())
      if swapped == facts.get("keys_first", frozenset()):
        raise first_error from None
      facts["keys_first"] = swapped
  if not context.get("windows"):
    return converted
  try:
    rings = convert(dict(facts, rings=context["windows"]))
  except ScanConversionError:
    return converted
  # scores as an output are rows over all L keys, which a ring does not hold
  if any(isinstance(k, History) for k in rings.out_kinds):
    return converted
  return rings


def _keys_first(context) -> frozenset:
  """The score products to swap after a failed conversion: those whose mask
  was refused, and every product with the same dimensions and shapes."""
  products = context.get("score_products", {})
  refused = {products[o] for o in context.get("refused_masks", ())
             if o in products}
  return frozenset(o for o, signature in products.items()
                   if signature in refused)
