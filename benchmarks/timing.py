"""Interleaved timing: every contestant of a comparison runs in the same
process, in alternation, after warm-up; the figure is the median.

A contestant is a pair ``(setup, work)``: ``setup()`` (untimed) returns
the argument of ``work`` (e.g. a fresh carry, since donated carries are
consumed), and ``work(arg)`` returns arrays, on which the timer blocks.
"""
import statistics
import time

import jax


def interleaved(contestants, *, repeats, warmup=1):
  """Median seconds of each contestant's ``work``.

  Args:
    contestants: dict name -> ``(setup, work)``.
    repeats: timed repetitions of each (after ``warmup`` untimed ones).
  Returns:
    dict name -> median seconds; the order alternates between repetitions
    (forward, then backward) so that drift in machine load hits all sides
    alike.
  """
  names = list(contestants)
  for _ in range(warmup):
    for name in names:
      setup, work = contestants[name]
      jax.block_until_ready(work(setup()))
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      setup, work = contestants[name]
      arg = jax.block_until_ready(setup())
      start = time.perf_counter()
      jax.block_until_ready(work(arg))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_calls(sequences, *, calls, repeats, warmup=1):
  """Median seconds of one call of each contestant, taking turns call by
  call: finer than :func:`interleaved`, for ratios of a few percent.

  Args:
    sequences: dict name -> ``start``; ``start()`` (untimed) begins a
      sequence and returns ``call(i)``, which makes call ``i`` (``0 <= i <
      calls``) and returns once its result is ready.
    calls: calls per sequence.
    repeats: timed sequences of each (after ``warmup`` untimed ones).
  Returns:
    dict name -> median seconds per call. The contestants' order rotates
    from call to call, so that each follows each as often.
  """
  names = list(sequences)
  times = {name: [] for name in names}
  for r in range(warmup + repeats):
    running = {name: start() for name, start in sequences.items()}
    for i in range(calls):
      k = i % len(names)
      for name in names[k:] + names[:k]:
        start = time.perf_counter()
        running[name](i)
        if r >= warmup:
          times[name].append(time.perf_counter() - start)
  return {name: statistics.median(ts) for name, ts in times.items()}


def seconds(fn):
  """Wall-clock seconds of one call of ``fn`` (blocked on its result) and
  the result."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out
