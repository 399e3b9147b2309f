"""A cllora command's output: its own lines shown, the third-party noise it lists hidden, every
other warning shown, and everything shown under --debug (cllora/logs.py).

Each case runs in a fresh interpreter, as a command does: logging and warning filters are
process-wide, and alembic registers its plugins (the ``setup plugin`` lines) once per process,
at the import of Flower's state database."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cllora.logs import NOISE

EMIT = """
import logging, sys, warnings
from cllora.logs import NOISE, configure_logging
configure_logging(debug=sys.argv[1] == "debug")
logging.getLogger("cllora").info("cllora: own line")
logging.getLogger("cllora.model.quant").info("cllora child line")
for noise in NOISE:
    if noise.logger:
        logging.getLogger(noise.logger).warning("prefix %s suffix", noise.text)
        logging.getLogger(noise.logger).warning("an unlisted warning of %s", noise.logger)
    else:
        warnings.warn(f"prefix {noise.text} suffix", noise.category)
        warnings.warn("an unlisted warning of this category", noise.category)
logging.getLogger("some.library").info("library info line")
logging.getLogger("some.library").warning("library warning line")
if len(sys.argv) > 2:
    import flwr.simulation  # opens alembic, whose plugins log `setup plugin ...` at INFO
"""


def _stderr(*args: str) -> str:
    done = subprocess.run([sys.executable, "-c", EMIT, *args], capture_output=True, text=True,
                          timeout=120, check=True)  # fmt: skip
    return done.stderr


def test_own_lines_shown_listed_noise_hidden_other_warnings_shown():
    err = _stderr("quiet")
    assert "cllora: own line" in err and "cllora child line" in err
    for noise in NOISE:
        assert noise.text not in err, noise
    for logger in {n.logger for n in NOISE if n.logger}:
        assert f"an unlisted warning of {logger}" in err
    assert "an unlisted warning of this category" in err
    assert "library warning line" in err
    assert "library info line" not in err


def test_debug_shows_everything():
    err = _stderr("debug")
    for noise in NOISE:
        assert noise.text in err, noise
    assert "library info line" in err and "cllora child line" in err


def test_flowers_database_set_up_is_not_shown():
    pytest.importorskip("flwr")
    assert "setup plugin" not in _stderr("quiet", "flwr")
    assert "setup plugin" in _stderr("debug", "flwr")  # what the quiet run hides
