"""Attention: the key/value cache, derived and proven.

``q·kᵀ`` (a ``dot_general`` pairing every position of one sequence with every
position of another) is not causal by itself. Its rule keeps a buffer of the
keys (the operand as it enters the contraction) of length L and gives the
scores the kind ``History``: rows are scanned, the key axis holds all L
positions, and in a block the keys after the newest element differ from
the training mode, though they are finite (its ``future`` record,
:class:`scanagram.kinds.Future`, is ``TAINTED_FINITE``). The rules here
follow that record through the graph (``future.TRANSFER``):

* a ``select_n`` (``jnp.where``) whose mask is known at conversion time and
  picks the same constant at every future key of every row makes the scores
  exact (``future`` = that constant);
* adding a constant that is below ``NEG_THRESHOLD`` at every future key (an
  additive mask, ``logits + where(tril, 0, -1e9)``) makes them ``LOW``:
  large and negative in both modes, though not the same number, so only
  softmax's max and ``exp`` (which makes them exactly 0) may follow;
* elementwise ops carry the record: a large negative constant minus a finite
  row maximum stays large and negative (``NEG``), ``exp`` or ``sigmoid`` of
  it is exactly 0, 0 times or over a finite value is 0;
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
(the rules for every other equation on scores), ``learning`` (what one
conversion learns for the next: windows, products to swap).
"""
from scanagram.rules.attention import contractions, scores  # noqa: F401  (registers)
