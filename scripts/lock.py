"""The lock of the tested package set (``requirements.lock``): apply it, check it, write it anew.

Usage (with the environment's own Python; ``scripts/setup.sh`` and the Makefile call these)::

    python scripts/lock.py constraints build/constraints.txt   # the lock as pip constraints here
    python scripts/lock.py check [--strict]   # this environment's versions against the lock
    python scripts/lock.py sync               # uninstall what the lock does not list (own .venv)
    python scripts/lock.py freeze OUT         # write a lock from this environment (make lock)
    python scripts/lock.py versions           # the key versions on one line (for docs/install.md)

The lock lists every distribution that the two commands install, ``name==version``, torch
included. Applied as pip *constraints* (``pip install -c``), it fixes the version of whatever the
install needs without asking for anything more. torch is special (docs/install.md):
a torch that is already there is never replaced, so where the installed torch is not the locked
one, ``constraints`` leaves out torch and every locked package whose version that torch's own
requirements exclude (a CUDA build pins its triton and nvidia-* packages).

Only the standard library and pip's vendored ``packaging`` are imported: this runs before
anything else is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # a new venv has pip but not yet packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# Never listed: the project itself and the installer (a venv brings its own pip).
UNLOCKED = {"cllora", "pip"}
# The packages whose versions `versions` prints (docs/install.md, "The lock and the newest
# releases", names them).
KEY_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "triton", "huggingface-hub",
                "tokenizers", "accelerate", "kernels", "flwr", "ray")  # fmt: skip


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares names (``Foo_Bar`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """A version without its local label (``2.13.0+cpu`` -> ``2.13.0``): the lock names the
    release, whichever build of it (CPU or CUDA) the machine's index serves."""
    return version.split("+", 1)[0]


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{normalized name: version}`` of a lock file (comments and blank lines skipped)."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: {raw!r} is not 'name==version'")
        pins[normalize(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """``{normalized name: version}`` of the distributions this Python sees."""
    found = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def torch_excludes(pins: dict[str, str], have: dict[str, str]) -> set[str]:
    """Locked names left out of the constraints because of an installed torch that is not the
    locked one: torch itself and each package whose locked version torch's requirements refuse."""
    if "torch" not in have or "torch" not in pins or public(have["torch"]) == pins["torch"]:
        return set()
    out = {"torch"}
    for text in md.requires("torch") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = normalize(req.name)
        if name in pins and not req.specifier.contains(Version(pins[name]), prereleases=True):
            out.add(name)
    return out


def constraints(out: Path) -> None:
    """Write the lock as pip constraints for this environment (see the module doc)."""
    pins, have = read_lock(), installed()
    left_out = torch_excludes(pins, have)
    lines = [f"# {LOCK.name} for {sys.prefix}; left out for the installed torch: "
             f"{', '.join(sorted(left_out)) or 'nothing'}"]  # fmt: skip
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())
              if name not in left_out]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if left_out:
        print(f"lock: the installed torch {have['torch']} is kept; not pinned for it: "
              f"{', '.join(sorted(left_out))}")  # fmt: skip


def differences() -> tuple[list[str], list[str], list[str]]:
    """(version mismatches, installed but not locked, locked but not installed), as text."""
    pins, have = read_lock(), installed()
    skip = torch_excludes(pins, have) | UNLOCKED
    wrong = [f"{n} {public(have[n])} (locked {v})" for n, v in sorted(pins.items())
             if n in have and n not in skip and public(have[n]) != v]  # fmt: skip
    extra = sorted(n for n in have if n not in pins and n not in skip)
    missing = sorted(n for n in pins if n not in have and n not in skip)
    return wrong, extra, missing


def check(strict: bool) -> int:
    """Print how this environment differs from the lock; non-zero when ``strict`` and it does."""
    wrong, extra, missing = differences()
    for title, items in (("not the locked version", wrong), ("not in the lock", extra),
                         ("locked but not installed", missing)):  # fmt: skip
        if items:
            print(f"lock: {title}: {', '.join(items)}")
    if not (wrong or extra or missing):
        print(f"lock: this environment is exactly {LOCK.name}")
        return 0
    return 1 if strict else 0


def sync() -> None:
    """Uninstall what the lock does not list (the project's own ``.venv`` only: setup.sh)."""
    _, extra, _ = differences()
    if extra:
        print(f"lock: removing what {LOCK.name} no longer lists: {', '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *extra], check=True)


def freeze(out: Path) -> None:
    """Write a lock of this environment (a throw-away one that just passed the suite)."""
    have = {n: public(v) for n, v in installed().items() if n not in UNLOCKED}
    py = ".".join(map(str, sys.version_info[:2]))
    lines = [
        "# The package set the whole suite last passed with (README: The two commands).",
        f"# Python {py} on {sys.platform}; written by `make lock` (scripts/lock.py freeze).",
        "# Applied as pip constraints by scripts/setup.sh; torch only where none is installed.",
        *(f"{name}=={version}" for name, version in sorted(have.items())),
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"lock: wrote {len(have)} packages to {out}")


def versions() -> None:
    """The key packages' versions in this environment, one line."""
    have = installed()
    print(", ".join(f"{n} {public(have[n])}" for n in KEY_PACKAGES if n in have))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/lock.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("constraints", help="write the lock as constraints").add_argument("out")
    c = sub.add_parser("check", help="compare this environment with the lock")
    c.add_argument("--strict", action="store_true", help="exit 1 on any difference")
    sub.add_parser("sync", help="uninstall what the lock does not list")
    sub.add_parser("freeze", help="write a lock of this environment").add_argument("out")
    sub.add_parser("versions", help="the key versions, one line")
    args = p.parse_args(argv)
    if args.command == "constraints":
        constraints(Path(args.out))
    elif args.command == "check":
        return check(args.strict)
    elif args.command == "sync":
        sync()
    elif args.command == "freeze":
        freeze(Path(args.out))
    else:
        versions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
