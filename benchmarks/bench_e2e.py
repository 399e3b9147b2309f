"""``cllora bench`` as a script of the checkout: the engine is :mod:`cllora.bench.e2e`.

Usage::

    python benchmarks/bench_e2e.py --contexts 256,512,1024 --steps 2          # CPU, small scale
    python benchmarks/bench_e2e.py --providers cllora,hf-peft --workloads fixed \\
        --contexts 1024,4096 --model smollm2-135m --dtype bf16 --find-max-context --budget-gb 8

The same options, output and exit status as ``cllora bench`` (``--help`` lists them).
"""

from cllora.bench.e2e import main

if __name__ == "__main__":
    raise SystemExit(main())
