"""Benchmarks and profilers behind ``fastpeft bench``, ``fastpeft memory`` and ``fastpeft report``.

- :mod:`~fastpeft.benchmark.runner`: the shared timing (``triton.testing.do_bench`` on a GPU,
  ``torch.utils.benchmark`` on a CPU), environment metadata, JSON/CSV result files, tables;
- :mod:`~fastpeft.benchmark.providers` and :mod:`~fastpeft.benchmark.lowrank`: the low-rank
  layer microbenchmark, every provider side by side;
- :mod:`~fastpeft.benchmark.memory`: peak memory of one training step of a Llama-like decoder;
- :mod:`~fastpeft.benchmark.plots`: PNG charts; :mod:`~fastpeft.benchmark.readme`: the README's
  results section.

Optional dependencies (transformers, peft, bitsandbytes, matplotlib, tqdm, triton) are imported
only where used.
"""

from .runner import SavedBytes, Skip, Timing, environment, format_table, time_fn, write_results

__all__ = ["SavedBytes", "Skip", "Timing", "environment", "format_table", "time_fn", "write_results"]
