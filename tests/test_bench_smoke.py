"""The benchmark code runs at tiny sizes, so it cannot rot. No timing is
asserted: speed lives in benchmarks/ (make bench)."""
import json
import math

from benchmarks import run


def test_bench_smoke_writes_every_figure_and_the_plot(tmp_path):
  results = run.main(["--smoke", "--out", str(tmp_path)])
  written = json.loads((tmp_path / "bench.json").read_text())
  assert written == results
  for key in run.required_keys(run.SMOKE):
    assert key in written, key
    assert isinstance(written[key], (int, float)), key
    assert math.isfinite(written[key]), key
  assert written["smoke"] == 1
  # the carry sizes are exact, not timings: the derived carry is the cache
  assert written["transformer_carry_bytes_ratio"] > 0
  # ratios of two timings (the ragged figures are differences of timings:
  # at smoke sizes they may be noise of either sign)
  for key in ["extend8_over_step", "chunked_prefill_ratio"]:
    assert written[key] > 0, key
  png = (tmp_path / "bench.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_required_keys_name_every_figure_of_the_issue():
  keys = run.required_keys(run.FULL)
  for key in ["lstm_step_ratio", "wavenet_step_ratio", "transformer_step_ratio",
              "transformer_carry_bytes_ratio",
              "transformer_speedup_vs_recompute_T512",
              "convert_compile_ratio_24_layers", "torch_step_ratio",
              "torch_run_speedup", "convert_seconds_2_layers",
              "convert_seconds_6_layers", "convert_seconds_12_layers",
              "convert_seconds_24_layers", "extend8_over_step",
              "chunked_prefill_ratio", "ragged_generate_ratio",
              "ragged_generate_ratio_same_conversion",
              "rows_generate_ratio_vs_uniform",
              # long context, minimal carry, nothing recomputed
              "convert_seconds_L32768", "convert_peak_mib_L32768",
              "gqa_carry_bytes_ratio", "gqa_step_ratio", "encdec_step_ratio",
              "step_hlo_ratio",
              # every JAX framework
              "flax_step_ratio", "generate_loop_overhead"]:
    assert key in keys
