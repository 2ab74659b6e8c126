"""The interpreter's multi-pass facility: a Learner's facts reach the next
conversion (scanagram.interpreter.convert_learning)."""
import pytest

from scanagram import interpreter
from scanagram.errors import ScanConversionError
from scanagram.interpreter import Learner, convert_learning


class Counting(Learner):
  """Asks for one more after each refusal up to ``limit``; then for 10."""
  initial = 0

  def __init__(self, limit=2, keep=True):
    self.limit, self.keep = limit, keep

  def notes(self, facts):
    return {"facts": facts}

  def after_refusal(self, notes):
    return notes["facts"] + 1 if notes["facts"] < self.limit else None

  def improvement(self, notes):
    return 10

  def keeps(self, converted):
    return self.keep


def _needs(at_least, seen):
  def convert(conversion):
    (of,) = interpreter.LEARNERS
    facts = conversion.facts(of)
    conversion.notes(of)
    seen.append(facts)
    if facts < at_least:
      raise ScanConversionError(f"refused with {facts}")
    return facts
  return convert


def test_refusals_retry_with_new_facts_then_improve(monkeypatch):
  monkeypatch.setattr(interpreter, "LEARNERS", [Counting()])
  seen = []
  assert convert_learning(_needs(2, seen)) == 10
  assert seen == [0, 1, 2, 10]


def test_first_refusal_stands_when_nothing_new_is_learned(monkeypatch):
  monkeypatch.setattr(interpreter, "LEARNERS", [Counting(limit=1)])
  with pytest.raises(ScanConversionError, match="refused with 0"):
    convert_learning(_needs(5, []))


def test_improvement_not_kept(monkeypatch):
  monkeypatch.setattr(interpreter, "LEARNERS", [Counting(keep=False)])
  assert convert_learning(_needs(1, [])) == 1


def test_improvement_that_is_refused_keeps_the_first(monkeypatch):
  monkeypatch.setattr(interpreter, "LEARNERS", [Counting()])

  def convert(conversion):
    facts = conversion.facts(interpreter.LEARNERS[0])
    if facts == 10:
      raise ScanConversionError("the improvement fails")
    return facts
  assert convert_learning(convert) == 0


def test_conversion_shares_notes_per_learner():
  of = Counting()
  conversion = interpreter.Conversion({of: 3})
  assert conversion.notes(of) is conversion.notes(of)
  assert conversion.notes(of) == {"facts": 3}
  assert interpreter.Conversion().facts(of) == 0
