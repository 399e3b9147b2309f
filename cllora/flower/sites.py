"""A config's data as one file per client: the sites of a deployment tried on one machine.

Usage::

    cllora flower sites sites                       # the builtin corpus: sites/data.jsonl, ...
    cllora flower sites sites examples/medquad.yaml partition.method=iid partition.num_clients=3

    from cllora.flower.sites import write_sites
    write_sites(load_config(None, []), Path("sites"))   # [(Path("sites/data.jsonl"), 87), ...]

In a deployment every SuperNode reads its own file (``--node-config "data-path=..."``). To try
one on a single machine, this writes the files: under ``partition.method=field``, one file per
distinct value of ``partition.field`` (the clients ``cllora run`` makes: for the defaults, the
builtin corpus's five sources); under any other method, the records shuffled with the config's
``seed`` and dealt in turn to ``partition.num_clients`` files ``site-00``, ``site-01``, ... The
records are read as the run reads them (``data.max_records`` included) and written as JSON
lines with their fields as read; each node then splits its file into train and test sets as
``cllora run`` splits one client. ``directory`` must be new or empty: nothing is overwritten.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from cllora.config import Config
from cllora.data.pipeline import run_records
from cllora.data.readers import DataError, Malformed


def split_records(cfg: Config) -> dict[str, list[dict]]:
    """The records of each site, by its name (see the module doc)."""
    skip = Malformed(cfg.data.on_malformed)
    records = run_records(cfg, skip)
    skip.report()  # records skipped as malformed (data.on_malformed=skip), as one warning
    part = cfg.partition
    sites: dict[str, list[dict]] = {}
    if part.method == "field":
        for rec in records:
            if part.field not in rec:
                raise DataError(
                    f"{rec.get('_where', '?')}: partition.field={part.field!r} is missing from "
                    "the record: choose another field or partition.method=iid"
                )
            sites.setdefault(str(rec[part.field]), []).append(rec)
        return dict(sorted(sites.items()))
    order = list(records)
    random.Random(cfg.seed).shuffle(order)
    for k in range(part.num_clients):
        sites[f"site-{k:02d}"] = order[k :: part.num_clients]
    return sites


def write_sites(cfg: Config, directory: Path) -> list[tuple[Path, int]]:
    """Write one JSONL file per site into ``directory``; each file and its record count."""
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(
            f"{directory} exists and is not an empty directory: name a new one (nothing is "
            "overwritten)"
        )
    sites = split_records(cfg)
    empty = [name for name, recs in sites.items() if not recs]
    if empty:
        raise DataError(f"sites {', '.join(empty)} would hold no record: ask for fewer clients")
    directory.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for name, recs in sites.items():
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "site"
        while stem in used:
            stem += "_"
        used.add(stem)
        path = directory / f"{stem}.jsonl"
        with path.open("x", encoding="utf-8") as f:
            for rec in recs:
                fields = {k: v for k, v in rec.items() if k != "_where"}
                f.write(json.dumps(fields, ensure_ascii=False, default=str) + "\n")
        written.append((path, len(recs)))
    return written
