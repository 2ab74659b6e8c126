"""The README's primitive tables match the rule registry."""
import pathlib
import re

import jax.extend.core.primitives as P

import scanagram  # noqa: F401  (registers the rules)
from scanagram.interpreter import RULES

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def _table_rows(heading):
  lines = README.split(heading, 1)[1].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|"))
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append(line)
  return rows


def _table_names(heading):
  names = set()
  for row in _table_rows(heading):
    cells = [c.strip() for c in row.strip("|").split("|")]
    column = cells[1] if heading == "## Supported primitives" else cells[0]
    names.update(re.findall(r"[\w-]+", column))
  return names


def test_every_rule_is_in_the_supported_table():
  supported = _table_names("## Supported primitives")
  missing = {p.name for p, _ in RULES} - supported
  assert not missing, f"rules missing from the README table: {missing}"


def test_every_primitive_is_supported_or_explained():
  supported = _table_names("## Supported primitives")
  unsupported = _table_names("**Unsupported**, with the reason:")
  every = {getattr(P, n).name for n in dir(P) if n.endswith("_p")}
  unexplained = every - supported - unsupported
  assert not unexplained, f"primitives neither supported nor explained: " \
                          f"{sorted(unexplained)}"
  wrongly_listed = unsupported & {p.name for p, _ in RULES}
  assert not wrongly_listed, wrongly_listed
