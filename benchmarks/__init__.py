"""Benchmarks: scanagram's derived steps against hand-written steps and
against naive recomputation. Run ``python -m benchmarks.run`` (``make
bench``)."""
