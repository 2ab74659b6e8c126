"""What attention learns in one conversion that another needs: the window a
mask proves (convert again with rings of that size), and the score products
whose mask was refused (convert again with their operands' roles swapped:
keys as the lhs, ``k·qᵀ``, as einops and named einsums emit it)."""
import dataclasses
from typing import Any, Dict, FrozenSet, Set

from scanagram.interpreter import Learner, learner
from scanagram.kinds import History


@dataclasses.dataclass(frozen=True)
class Facts:
  """Given to a conversion.

  Attributes:
    keys_first: the score products (their ``q·kᵀ`` equations) whose lhs is
      the keys.
    rings: product -> w: keep a ring of the last w keys, not all L.
  """
  keys_first: FrozenSet[Any] = frozenset()
  rings: Dict[Any, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Notes:
  """What the attention rules record in one conversion.

  Attributes:
    facts: what it was given.
    score_products: product -> its signature (dimension numbers, shapes);
      products of one signature are the layers of one model.
    refused_masks: the products whose mask was refused.
    windows: product -> the widest window its masks prove.
    mask_proofs: proof key -> result; every layer applies the same mask, so
      it is proven once.
  """
  facts: Facts
  score_products: Dict[Any, Any] = dataclasses.field(default_factory=dict)
  refused_masks: Set[Any] = dataclasses.field(default_factory=set)
  windows: Dict[Any, int] = dataclasses.field(default_factory=dict)
  mask_proofs: Dict[Any, Any] = dataclasses.field(default_factory=dict)

  def record_window(self, product, window: int):
    self.windows[product] = max(self.windows.get(product, 0), window)


@learner
class ATTENTION(Learner):
  """* After a refused mask: swap the operands of that product and of every
    product with the same signature (the other layers); when nothing new is
    swapped, the first refusal stands.
  * After a success where masks proved windows: rings of those sizes, kept
    unless scores are an output (rows over all L keys, which a ring does
    not hold); a mask checked again against the keys outside the window
    that fails there keeps the full buffers."""
  initial = Facts()

  def notes(self, facts: Facts) -> Notes:
    return Notes(facts)

  def after_refusal(self, notes: Notes) -> Facts:
    refused = {notes.score_products[o] for o in notes.refused_masks
               if o in notes.score_products}
    swapped = frozenset(o for o, signature in notes.score_products.items()
                        if signature in refused)
    return dataclasses.replace(
        notes.facts, keys_first=notes.facts.keys_first | swapped)

  def improvement(self, notes: Notes):
    if not notes.windows:
      return None
    return dataclasses.replace(notes.facts, rings=dict(notes.windows))

  def keeps(self, converted) -> bool:
    return not any(isinstance(k, History) for k in converted.out_kinds)
