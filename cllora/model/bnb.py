"""bitsandbytes, imported so that nothing reaches for the network.

Usage::

    from cllora.model.bnb import bnb          # the bitsandbytes package, imported here
    import bitsandbytes.functional as bf      # any submodule afterwards, as usual

Every cllora module that uses bitsandbytes imports it through this one first. The reason:
bitsandbytes 0.49 and 0.50, on a CPU with AVX512-BF16,, asks the Hugging Face hub for a CPU kernel
(``kernels.get_kernel("kernels-community/...")``) while its CPU backend is imported, and logs
"Failed to load CPU gemm_4bit_forward from kernels-community ... pip install kernels" when that
fails, although its own compiled CPU code then serves every call. cllora promises that a run
downloads nothing, and a run must not depend on what a hub serves that day, so the import here
hides Hugging Face's ``kernels`` package from bitsandbytes for the length of the import (its
``from kernels import get_kernel`` fails as if it were not installed, nothing is looked up) and
drops that one log line. The hidden lookup only concerns bitsandbytes' CPU inference kernel for
single-token bf16 products (``gemv_4bit``); training and CUDA use other code.

If something imported bitsandbytes before cllora did (``import peft`` does), the lookup has
already happened there; the CLI imports it here first. ``tests/model/test_offline.py`` runs a
4-bit ``cllora run`` with the network unreachable and fails on any attempt to reach it.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

# bitsandbytes' module that looks the hub kernel up, and the text of its message about it
_LOOKUP_LOGGER = "bitsandbytes.backends.cpu.ops"
_LOOKUP_MESSAGE = "kernels-community"


class _DropHubLookupMessage(logging.Filter):
    """Drops the log record about the hub kernel lookup, and only that one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _LOOKUP_MESSAGE not in record.getMessage()


def import_bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` package, imported (once per process) without the hub lookup."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    missing = object()
    hub_kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # import of it raises ImportError
    lookup_log, drop = logging.getLogger(_LOOKUP_LOGGER), _DropHubLookupMessage()
    lookup_log.addFilter(drop)
    try:
        import bitsandbytes
    finally:
        lookup_log.removeFilter(drop)
        if hub_kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hub_kernels
    log.debug("bitsandbytes %s imported without its hub kernel lookup", bitsandbytes.__version__)
    return bitsandbytes


bnb = import_bitsandbytes()
