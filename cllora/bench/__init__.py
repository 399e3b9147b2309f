"""The benchmark engine: what ``cllora bench`` and ``cllora profile`` run, installed with cllora.

Usage::

    cllora bench --contexts 256,512,1024 --steps 2      # training-step speed and memory
    cllora profile --contexts 512,1024,2048             # where the step's time goes

    from cllora.bench.cells import BenchSpec
    from cllora.bench.e2e import run_benchmark
    csv_path = run_benchmark(BenchSpec(contexts=[256, 512]))

Modules: :mod:`cllora.bench.providers` (each provider, parsed once from its name),
:mod:`cllora.bench.step` (the training step a provider runs: timed here, traced by
:mod:`cllora.plan.step`), :mod:`cllora.bench.cells` (one cell in this process),
:mod:`cllora.bench.e2e` (``cllora bench``: every cell in a fresh ``python -m cllora.bench.e2e``
process, the CSV), :mod:`cllora.bench.figure` (its PNG), :mod:`cllora.bench.profile`
(``cllora profile``), :mod:`cllora.bench.report` (markdown tables of the CSVs, docs/gpu.md's).
The checkout's ``benchmarks/`` keeps thin scripts calling these and the results
(``benchmarks/results/``).
"""
