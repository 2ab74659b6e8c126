"""scanagram.export: save / load a derived step, and refusing bad files."""
import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scanagram import export

B, T, D = 2, 6, 3


def _model(params, xs):
  """xs: [B, T, D] -> {"y": [B, T, D], "n": [B, T] int32}."""
  prev = jnp.pad(xs, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  h = jnp.tanh(xs @ params["w"] + prev)
  return {"y": jnp.cumsum(h, axis=1),
          "n": jnp.cumsum((h[..., 0] > 0).astype(jnp.int32), axis=1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  from adapters.haiku import StepPair
  params = {"w": jax.random.normal(jax.random.key(0), (D, D))}
  xs = jax.random.normal(jax.random.key(1), (B, T, D))
  pair = StepPair(_model, (params,), xs, axis=1)
  path = str(tmp_path_factory.mktemp("export") / "step.zip")
  assert export.save(pair, params, path, prompt_lengths=(2, T)) == path
  return path, params, xs, _model(params, xs)


def _close(got, want):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5,
                                                       atol=1e-5), got, want)


def test_loaded_functions_equal_the_model(saved):
  path, params, xs, want = saved
  pair = export.load(path)
  assert isinstance(pair, export.ExportedPair)
  assert (pair.axis, pair.length, pair.max_length) == (1, T, None)
  assert pair.prefill_lengths in (None, [0, 2, T])
  carry, out = pair.prefill(pair.params, xs[:, :2])
  _close(out, jax.tree.map(lambda a: a[:, :2], want))
  carry, y = pair.step(pair.params, carry, xs[:, 2])
  _close(y, jax.tree.map(lambda a: a[:, 2], want))
  _, ys = pair.run(pair.params, carry, xs[:, 3:])
  _close(ys, jax.tree.map(lambda a: a[:, 3:], want))
  carry, empty = pair.prefill(pair.params, xs[:, :0])
  assert empty["y"].shape == (B, 0, D)
  _close(pair.run(pair.params, carry, xs)[1], want)


def test_save_refuses_state_the_model_does_not_have(saved, tmp_path):
  from adapters.haiku import StepPair
  _, params, xs, _ = saved
  pair = StepPair(_model, (params,), xs, axis=1)
  with pytest.raises(TypeError, match="no state"):
    export.save(pair, params, str(tmp_path / "s.zip"), state={})


# -- bad files -----------------------------------------------------------------
def _rewrite(path, out, change):
  """A copy of the zip ``path`` at ``out`` with ``change(members)`` applied
  to its {name: bytes}."""
  with zipfile.ZipFile(path) as z:
    members = {name: z.read(name) for name in z.namelist()}
  change(members)
  with zipfile.ZipFile(out, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return out


def _with_meta(edit):
  def change(members):
    meta = json.loads(members["meta.json"])
    edit(meta)
    members["meta.json"] = json.dumps(meta)
  return change


def _refused(path, message):
  with pytest.raises(ValueError, match=message) as info:
    export.load(path)
  assert str(info.value).startswith(f"cannot load {path}: ")
  return str(info.value)


def test_a_truncated_file_is_refused(saved, tmp_path):
  data = open(saved[0], "rb").read()
  for n in (len(data) // 2, len(data) - 1, 10, 0):
    path = tmp_path / f"truncated_{n}.zip"
    path.write_bytes(data[:n])
    _refused(str(path), "not a zip archive")


def test_random_bytes_are_refused(tmp_path):
  path = tmp_path / "random.zip"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  _refused(str(path), r"not a zip archive \(truncated, or another format\)")


def test_another_zip_is_refused(tmp_path):
  path = str(tmp_path / "other.zip")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("meta.json", json.dumps({"format": "other", "version": 1}))
  _refused(path, r"not a 'scanagram-step' file of version 1 \(meta.json has "
           r"format and version \('other', 1\)\)")
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("data.txt", "hello")
  _refused(path, "no member 'meta.json'")


@pytest.mark.parametrize("member", ["meta.json", "step.jax", "init.jax",
                                    "params/0.bin"])
def test_a_zip_missing_a_member_is_refused(saved, tmp_path, member):
  path = _rewrite(saved[0], str(tmp_path / "missing.zip"),
                  lambda members: members.pop(member))
  _refused(path, f"it has no member '{member}'")


def test_corrupt_members_are_refused(saved, tmp_path):
  def garbage(members):
    members["step.jax"] = b"\x00" * 16
  path = _rewrite(saved[0], str(tmp_path / "garbage.zip"), garbage)
  _refused(path, "step.jax is not a jax.export serialization")

  def short_params(members):
    members["params/0.bin"] = members["params/0.bin"][:-4]
  path = _rewrite(saved[0], str(tmp_path / "short.zip"), short_params)
  _refused(path, r"params/0.bin holds 32 bytes, but meta.json 'params\[0\]' "
           r"says float32\[3, 3\] \(36 bytes\)")

  def not_json(members):
    members["meta.json"] = b"{\"format\": "
  path = _rewrite(saved[0], str(tmp_path / "json.zip"), not_json)
  _refused(path, "meta.json is not JSON")

  # a flipped byte inside a stored member: the zip's CRC check fails
  data = bytearray(open(saved[0], "rb").read())
  with zipfile.ZipFile(saved[0]) as z:
    info = z.getinfo("params/0.bin")
  start = info.header_offset + 30 + len(info.filename) + len(info.extra)
  data[start] ^= 0xFF
  path = tmp_path / "crc.zip"
  path.write_bytes(bytes(data))
  _refused(str(path), "its member 'params/0.bin' is corrupt: Bad CRC-32")


def _set(key, value):
  return lambda meta: meta.__setitem__(key, value)


def _set_spec(key, i, field, value):
  return lambda meta: meta[key][i].__setitem__(field, value)


TAMPERED = {
    "no axis": (lambda meta: meta.pop("axis"), "meta.json has no entry 'axis'"),
    "length a string": (_set("length", "6"),
                        "meta.json entry 'length' is '6', not an int >= 1"),
    "version 2": (_set("version", 2), "not a 'scanagram-step' file of "
                  r"version 1 \(meta.json has format and version "
                  r"\('scanagram-step', 2\)\)"),
    "a list": (lambda meta: (meta.clear(), meta.update(format=[])),
               "not a 'scanagram-step' file"),
    "params shape": (_set_spec("params", 0, "shape", [3, 4]),
                     r"meta.json entry 'params\[0\]' says float32\[3, 4\], "
                     r"but the exported init takes float32\[3, 3\]"),
    "x dtype": (_set_spec("x_specs", 0, "dtype", "int32"),
                r"meta.json entry 'x_specs\[0\]' says int32\[2, 3\], but "
                r"the exported step takes float32\[2, 3\]"),
    "unknown dtype": (_set_spec("x_specs", 0, "dtype", "float99"),
                      r"'x_specs\[0\]' has the unknown dtype 'float99'"),
    "negative size": (_set_spec("params", 0, "shape", [-1, 3]),
                      r"'params\[0\]' is \{'shape': \[-1, 3\]"),
    "x_tree node": (_set("x_tree", {"bogus": 1}),
                    "meta.json entry 'x_tree' has the node {'bogus': 1} of "
                    "unknown kind"),
    "y_tree leaves": (_set("y_tree", {"list": [{"leaf": True}] * 3}),
                      "meta.json entry 'y_tree' has 3 leaves, but the "
                      "exported step returns 2"),
    "out_tree leaves": (_set("out_tree", {"leaf": True}),
                        "meta.json entry 'out_tree' has 1 leaves but "
                        "'out_specs_at_1' 2 specs"),
    "functions": (lambda meta: meta["functions"].remove("step"),
                  r"meta.json entry 'functions' lacks \['step'\]"),
    "prefill lengths": (lambda meta: meta["prefill"].update(lengths=[0, 99]),
                        r"'prefill' has lengths \[0, 99\], not in 1..L=6"),
    "axis": (_set("axis", 7), "meta.json entry 'axis' is 7, not an axis"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_meta_entry_is_refused(saved, tmp_path, case):
  edit, message = TAMPERED[case]
  path = _rewrite(saved[0], str(tmp_path / "tampered.zip"), _with_meta(edit))
  text = _refused(path, message)
  assert text.endswith("write it again with scanagram.export.save")


def test_a_missing_file_is_an_os_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    export.load(str(tmp_path / "nowhere.zip"))
