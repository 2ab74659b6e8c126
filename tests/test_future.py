"""The future record of attention scores (scanagram.kinds.Future) and its
transfer: elementwise ops through the table, a select's picked cases,
reductions over the keys and over other axes."""
import numpy as np
import pytest
from jax.extend.core import primitives as P

from scanagram.kinds import (EXACT, LOW, NEG, TAINTED, TAINTED_FINITE, Future,
                             History)
from scanagram.rules.attention.future import (allows_reduction, picked_future,
                                              reduced_future, transfer)


def through(name, *futures):
  """The record after primitive ``name`` on operands with ``futures``;
  constants are computed with the primitive on float32 numbers."""
  primitive = getattr(P, name + "_p")

  def evaluate(numbers):
    return primitive.bind(*[np.float32(x) for x in numbers])
  return transfer(name, list(futures), evaluate)


def c(number):
  return Future.constant(number)


# -- the lattice ---------------------------------------------------------------
def test_named_records():
  assert TAINTED.tainted and TAINTED_FINITE.tainted
  assert not (EXACT.tainted or NEG.tainted or LOW.tainted or c(0).tainted)
  assert NEG.exact and NEG.below and not LOW.exact and LOW.below
  assert TAINTED_FINITE.finite and not TAINTED.finite
  assert c(0.0).zero and c(-0.0).zero and not EXACT.zero
  assert History(0, 1).future == TAINTED


def test_repr_and_str():
  assert repr(TAINTED) == "Future(TAINTED)"
  assert repr(c(0)) == "Future(0.0)"
  assert f"{NEG} {LOW} {EXACT} {c(1)}" == "NEG LOW EXACT 1.0"


def test_constant_below_the_threshold_counts_as_neg():
  minus = c(-1e9)
  assert minus.exact and minus.below and minus.value == -1e9
  assert c(-1e4).below and not c(-9999.0).below
  assert through("exp", minus) == c(0.0) == through("exp", NEG)
  assert through("sub", minus, EXACT) == NEG == through("sub", NEG, EXACT)
  assert through("max", minus, LOW) == LOW == through("max", NEG, LOW)
  for name in ("reduce_max", "reduce_sum", "argmax"):
    assert allows_reduction(minus, name, 4) == allows_reduction(NEG, name, 4)
  assert picked_future([minus]) == NEG  # the record keeps only "below"


# -- elementwise ops -----------------------------------------------------------
def test_constants_are_computed():
  assert through("mul", c(2.0), c(3.0)) == c(6.0)
  assert through("add", c(-1e9), c(1.0)) == NEG   # below: recorded as NEG
  assert through("div", c(1.0), c(0.0)) == EXACT  # +inf: only exact
  assert through("sub", c(0.0), c(np.inf)) == NEG  # -inf is below


def test_exp_of_below_is_zero():
  assert through("exp", NEG) == c(0.0)
  assert through("exp2", LOW) == c(0.0)
  assert through("exp", EXACT) == EXACT
  # kernel attention, exp(q·k) * mask: its logits are taken not to overflow
  # (the training mode would hold inf or NaN there)
  assert through("exp", TAINTED_FINITE) == TAINTED_FINITE
  assert through("exp", TAINTED) == TAINTED


def test_sigmoid_of_below_is_zero():
  assert through("logistic", NEG) == c(0.0) == through("logistic", LOW)
  assert through("logistic", TAINTED_FINITE) == TAINTED_FINITE
  assert through("logistic", EXACT) == EXACT


def test_below_plus_or_minus_a_plain_value_stays_below():
  assert through("add", LOW, EXACT) == LOW == through("add", EXACT, LOW)
  assert through("add", LOW, c(3.0)) == LOW
  assert through("sub", LOW, EXACT) == LOW
  assert through("sub", NEG, EXACT) == NEG
  assert through("sub", NEG, c(5.0)) == NEG
  assert through("add", EXACT, NEG) == NEG


def test_what_does_not_stay_below():
  assert through("sub", NEG, c(np.inf)) == EXACT    # -inf - inf is NaN
  assert through("add", LOW, c(-1e9)) == TAINTED    # not a row maximum
  assert through("sub", EXACT, NEG) == EXACT
  assert through("sub", EXACT, LOW) == TAINTED
  assert through("add", LOW, TAINTED_FINITE) == TAINTED
  # (s1 - 1e9) - (s2 - 1e9) is s1 - s2: finite, differing in the step
  assert through("sub", LOW, LOW) == TAINTED


def test_low_times_anything_is_tainted():
  for other in (EXACT, c(2.0), c(0.0), NEG, LOW):
    assert through("mul", LOW, other) == TAINTED
  assert through("neg", LOW) == TAINTED


def test_zero_times_finite_is_zero():
  assert through("mul", c(0.0), TAINTED_FINITE) == c(0.0)
  assert through("mul", TAINTED_FINITE, c(-0.0)) == c(0.0)
  assert through("mul", EXACT, c(0.0)) == c(0.0)
  assert through("mul", c(0.0), TAINTED) == TAINTED   # 0 · inf is NaN
  assert through("and", c(0.0), TAINTED_FINITE) == c(0.0)


def test_division():
  assert through("div", TAINTED_FINITE, c(8.0)) == TAINTED_FINITE
  assert through("div", TAINTED_FINITE, c(0.0)) == TAINTED
  assert through("div", TAINTED_FINITE, c(np.inf)) == TAINTED
  assert through("div", TAINTED_FINITE, EXACT) == TAINTED
  assert through("div", c(0.0), EXACT) == c(0.0)
  assert through("div", c(0.0), LOW) == TAINTED
  assert through("div", c(0.0), TAINTED_FINITE) == TAINTED


def test_max_of_below():
  assert through("max", NEG, LOW) == LOW
  assert through("max", NEG, NEG) == NEG
  assert through("max", LOW, LOW) == LOW
  assert through("max", NEG, EXACT) == EXACT
  assert through("max", LOW, EXACT) == TAINTED
  assert through("max", NEG, TAINTED_FINITE) == TAINTED_FINITE


def test_default_rule():
  assert through("mul", EXACT, EXACT) == EXACT
  assert through("mul", TAINTED_FINITE, TAINTED_FINITE) == TAINTED_FINITE
  assert through("mul", TAINTED_FINITE, EXACT) == TAINTED_FINITE
  assert through("add", TAINTED_FINITE, TAINTED) == TAINTED
  assert through("log", TAINTED_FINITE) == TAINTED   # log 0 is -inf


@pytest.mark.parametrize("name", ["stop_gradient", "copy", "reduce_precision",
                                  "name", "convert_element_type",
                                  "sharding_constraint"])
def test_identity_ops_keep_the_record(name):
  for record in (NEG, LOW, EXACT, TAINTED_FINITE, TAINTED):
    assert through(name, record) == record


# -- a select ------------------------------------------------------------------
def test_picked_cases():
  assert picked_future([]) == EXACT
  assert picked_future([c(0.0), c(-0.0)]) == c(0.0)
  assert picked_future([c(0.0), c(1.0)]) == EXACT
  assert picked_future([NEG, c(-1e30), c(-np.inf)]) == NEG
  assert picked_future([NEG, EXACT]) == EXACT


# -- reductions ----------------------------------------------------------------
def test_reductions_over_the_keys():
  for record in (NEG, LOW):
    assert allows_reduction(record, "reduce_max", window=4)
    assert not allows_reduction(record, "argmax", window=4)
    assert not allows_reduction(record, "reduce_sum", window=4)
  assert allows_reduction(c(0.0), "reduce_sum", window=4)
  assert not allows_reduction(EXACT, "reduce_sum", window=4)
  assert not allows_reduction(c(0.0), "reduce_max", window=4)
  assert allows_reduction(EXACT, "reduce_sum")
  assert allows_reduction(LOW, "argmax")
  assert not allows_reduction(LOW, "reduce_sum")
  assert not allows_reduction(LOW, "reduce_min")
  assert not allows_reduction(TAINTED_FINITE, "reduce_max")


def test_reductions_over_other_axes():
  assert reduced_future(TAINTED_FINITE, "reduce_sum") == TAINTED_FINITE
  assert reduced_future(TAINTED_FINITE, "reduce_max") == TAINTED
  assert reduced_future(LOW, "reduce_max") == LOW
  assert reduced_future(LOW, "reduce_sum") == TAINTED
  assert reduced_future(c(0.0), "reduce_sum") == c(0.0)
  assert reduced_future(c(0.0), "reduce_max") == EXACT
  assert reduced_future(NEG, "reduce_max") == EXACT
