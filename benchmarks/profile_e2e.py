"""``cllora profile`` as a script of the checkout: the engine is :mod:`cllora.bench.profile`.

Usage::

    python benchmarks/profile_e2e.py --contexts 256,512,1024,2048    # CPU, SmolLM2-135M
    python benchmarks/profile_e2e.py --device cuda --dtype bf16 --model llama-3.1-8b \\
        --provider cllora-4bit --contexts 1024,2048,4096,8192

The same options, output and exit status as ``cllora profile`` (``--help`` lists them).
"""

from cllora.bench.profile import main

if __name__ == "__main__":
    raise SystemExit(main())
