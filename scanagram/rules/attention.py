"""Attention: recognised in the jaxpr, its key/value cache derived.

(Placeholder hooks until the History kind lands: nothing is attention yet, so
``dot_general`` over two positions of the sequence is refused.)
"""


def has_history(e) -> bool:
  return False


def is_attention_contraction(e) -> bool:
  return False
