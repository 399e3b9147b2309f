"""`cllora flower sites`: the config's data as one file per client, read back as the run reads
them; nothing overwritten."""

from __future__ import annotations

import json

import pytest

from cllora.cli import main
from cllora.data.builtin import builtin_records
from cllora.data.readers import read_records


def test_field_partition_writes_one_file_per_value(tmp_path, capsys):
    assert main(["flower", "sites", str(tmp_path / "sites")]) == 0
    files = sorted((tmp_path / "sites").glob("*.jsonl"))
    sources = sorted({r["source"] for r in builtin_records()})
    assert [f.stem for f in files] == sources
    for f in files:  # each file is one source's records, readable as data
        recs = read_records(f)
        assert {r["source"] for r in recs} == {f.stem}
        assert "_where" not in json.loads(f.read_text().splitlines()[0])
    assert sum(len(read_records(f)) for f in files) == len(builtin_records())
    assert "5 sites" in capsys.readouterr().out


def test_iid_split_deals_every_record_once(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"a{i}"}) + "\n"
                            for i in range(10)))  # fmt: skip
    out = tmp_path / "sites"
    args = ["flower", "sites", str(out), f"data.path={data}", "partition.method=iid",
            "partition.num_clients=3"]  # fmt: skip
    assert main(args) == 0
    sizes = {f.stem: len(read_records(f)) for f in out.glob("*.jsonl")}
    assert sizes == {"site-00": 4, "site-01": 3, "site-02": 3}
    questions = [r["question"] for f in out.glob("*.jsonl") for r in read_records(f)]
    assert sorted(questions) == sorted(f"q{i}?" for i in range(10))


@pytest.mark.parametrize("existing", ["file", "full-dir"])
def test_an_existing_target_is_refused_untouched(tmp_path, capsys, existing):
    target = tmp_path / "sites"
    if existing == "file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "language.jsonl").write_text("mine")
    assert main(["flower", "sites", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing is overwritten" in err
    mine = target if existing == "file" else target / "language.jsonl"
    assert mine.read_text() == "mine"
