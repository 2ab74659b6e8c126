"""setup.cfg: the distribution owns only ``scanagram`` (``adapters/`` is
installed as ``scanagram.adapters``), its extras and version bounds."""
import ast
import configparser
import importlib
import pathlib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).parent.parent


def _options():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg


def _lines(value):
  return [line.strip() for line in value.strip().splitlines() if line.strip()]


def _requirements(value):
  return {r.name: r for r in map(Requirement, _lines(value))}


def _pins():
  """name -> version pinned in requirements.txt."""
  pins = {}
  for line in (ROOT / "requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if "==" in line:
      name, version = line.split("==")
      pins[name.strip()] = version.strip()
  return pins


def test_adapters_are_installed_as_scanagram_adapters():
  options = _options()["options"]
  assert dict(line.replace(" ", "").split("=") for line in _lines(
      options["package_dir"])) == {"scanagram.adapters": "adapters"}
  packages = set(_lines(options["packages"]))
  assert {name.split(".")[0] for name in packages} == {"scanagram"}
  # every package folder of the checkout is listed, under its installed name
  found = {".".join(p.parent.relative_to(ROOT).parts)
           for p in (ROOT / "scanagram").rglob("__init__.py")}
  found |= {".".join(("scanagram",) + p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "adapters").rglob("__init__.py")}
  assert packages == found


def test_version_bounds_and_extras():
  options = _options()
  install = _requirements(options["options"]["install_requires"])
  assert set(install) == {"jax", "numpy"}
  assert install["jax"].specifier == Requirement("jax>=0.10.2,<0.11").specifier
  pins = _pins()
  assert pins["jax"] in install["jax"].specifier
  extras = {name: _requirements(value) for name, value in
            options["options.extras_require"].items()}
  assert set(extras["haiku"]) == {"dm-haiku"}
  for name in ("flax", "equinox", "torch"):
    assert str(extras[name][name].specifier) == f"=={pins[name]}"
  assert set(extras["torch"]) == {"torch", "flatbuffers"}
  assert set(extras["export"]) == {"flatbuffers"}
  union = {}
  for name in ("export", "haiku", "flax", "equinox", "torch"):
    union.update(extras[name])
  assert extras["all"] == union


def test_license_is_apache_2():
  assert "license_files = LICENSE" in (ROOT / "setup.cfg").read_text()
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License\n                           Version 2.0" in text
  assert "Copyright 2026 The scanagram authors" in text


@pytest.mark.parametrize("path", sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "adapters").rglob("*.py")))
def test_adapters_import_their_siblings_relatively(path):
  """An adapter module is both ``adapters.x`` (a checkout) and
  ``scanagram.adapters.x`` (installed): ``import adapters...`` would load a
  second copy, or fail where only ``scanagram`` is installed."""
  tree = ast.parse((ROOT / path).read_text())
  absolute = [node.lineno for node in ast.walk(tree)
              if (isinstance(node, ast.ImportFrom) and node.level == 0 and
                  (node.module or "").split(".")[0] == "adapters") or
              (isinstance(node, ast.Import) and any(
                  a.name.split(".")[0] == "adapters" for a in node.names))]
  assert not absolute, f"{path}: absolute imports of adapters at lines " \
      f"{absolute}: use relative imports"


@pytest.mark.parametrize("adapter,library", [("haiku", "haiku"),
                                             ("torch", "torch"),
                                             ("flax", "flax"),
                                             ("nnx", "flax"),
                                             ("equinox", "equinox")])
def test_both_names_of_an_adapter_have_the_same_public_names(adapter,
                                                             library):
  pytest.importorskip(library)
  installed = importlib.import_module(f"scanagram.adapters.{adapter}")
  checkout = importlib.import_module(f"adapters.{adapter}")
  assert installed.__all__ == checkout.__all__
  assert all(hasattr(installed, name) for name in installed.__all__)
  public = {name for name in dir(checkout) if not name.startswith("_")}
  assert public == {name for name in dir(installed)
                    if not name.startswith("_")}
