"""The umt5_fast benchmark suite: ``python -m benchmarks`` / ``umt5-fast bench``.

Modules:

- ``machine``: CPU description, the memory-bandwidth and GEMM probes that define the floor,
  process memory (RSS) readings.
- ``models``: the benchmark model shapes (tiny, umt5-small, umt5-base), their random-weight
  checkpoints (made with transformers on first use) and CTranslate2 conversions.
- ``workloads``: what is timed (encoder grid, greedy, beam, long inputs), their inputs, and the
  cost model that turns a workload into the floor time of a machine.
- ``engines``: one adapter per engine (umt5_fast backends and precisions, transformers,
  CTranslate2) with the same ``load`` / ``encode`` / ``generate`` interface.
- ``suite``: sweep presets, one fresh subprocess per (engine, workload) measurement, and the
  comparison columns (vs transformers, vs CTranslate2, vs the floor, correctness).
- ``report``: progress bar, terminal table, JSON file, PNG plots.

``test_micro_cpu.py`` holds per-kernel pytest-benchmark micro-benchmarks (``pytest benchmarks/``).
The package is also installed as ``umt5_fast.benchmarks``, so modules import each other relatively.
"""
