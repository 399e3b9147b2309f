"""The command line explains itself: every command's help describes each option with its default
and ends with examples, ``--version``, ``config --keys``, ``list``, options and overrides in any
order."""

from __future__ import annotations

import re

import pytest

from cllora import __version__
from cllora.cli import _parse, main
from cllora.config_reference import config_keys

COMMANDS = [
    [],
    ["run"],
    ["config"],
    ["sweep"],
    ["report"],
    ["list"],
    ["bench"],
    ["profile"],
    ["plan"],
    ["flower"],
    ["flower", "simulate"],
    ["flower", "app"],
    ["flower", "certs"],
    ["flower", "keys"],
]


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def _option_entries(text: str) -> dict[str, str]:
    """argparse's option entries: invocation (``--resume RUN_DIR``) -> its whole description."""
    section = text.split("\noptions:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if re.match(r"^  -", line):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation
            entries[current] = rest.strip()
        else:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a) or "cllora")
def test_every_help_describes_each_option_its_default_and_ends_with_examples(capsys, argv):
    text = _help(capsys, argv)
    entries = _option_entries(text)
    assert entries
    for invocation, description in entries.items():
        if invocation in ("-h, --help", "--version"):
            continue
        assert description, f"{argv}: {invocation} has no description"
        takes_value = any(not t.startswith("-") for t in invocation.replace(",", " ").split())
        if takes_value:  # a flag is off unless given; a value's default is said
            said = "default:" in description or "required" in description
            assert said, f"{argv}: {invocation} shows no default"
    epilog = text.rsplit("\nexamples:\n", 1)
    assert len(epilog) == 2, f"{argv}: no examples"
    assert re.search(r"^  (cllora|flwr) ", epilog[1], flags=re.M)
    assert "``" not in text  # no reST markup


def test_top_level_help_lists_every_command(capsys):
    text = _help(capsys, [])
    listed = re.findall(
        r"^    (\w+) +\S", text.split("  COMMAND\n", 1)[1].split("\n\n")[0], flags=re.M
    )
    assert listed == [
        "run", "config", "sweep", "report", "list", "bench", "profile", "plan", "flower",
    ]  # fmt: skip


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out.startswith(f"cllora {__version__} (torch ") and "transformers" in out


def test_config_keys_prints_every_key_its_default_allowed_values_and_meaning(capsys):
    assert main(["config", "--keys"]) == 0
    out = capsys.readouterr().out
    keys = re.findall(r"^(\S+) = ", out, flags=re.M)
    assert keys == config_keys()
    assert "\ntrain.lr = 0.0002\n    allowed: > 0\n    AdamW learning rate\n" in out
    assert "\nfed.server_lr = empty\n" in out and '\nrun_name = ""\n' in out
    assert main(["config", "--keys", "--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| key | default | allowed | meaning |"
    assert len(table) == 2 + len(keys)


def test_config_keys_takes_no_overrides(capsys):
    assert main(["config", "seed=3", "--keys"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes no config or overrides" in err[0]


def test_list_models_gives_every_known_name_and_its_size(capsys):
    from cllora.model.presets import PRESETS

    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    names = re.findall(r"^(\S+) +(?:embedded|test|preset) +\S+B|^(\S+) +(?:embedded|test|preset)",
                       out, flags=re.M)  # fmt: skip
    found = {a or b for a, b in names}
    assert found == {"smollm2-135m", "tiny-llama", "tiny-qwen2", "tiny-mistral", *PRESETS}
    assert re.search(r"^llama-3.1-8b +preset +8.03B ", out, flags=re.M)
    assert re.search(r"^smollm2-135m +embedded +134.5M ", out, flags=re.M)


COUNTED = ["tiny-qwen2", "tiny-mistral", "mistral-7b-v0.3", "qwen2.5-7b"]
# Built on the meta device in a fresh interpreter: in a pytest worker that has run bitsandbytes'
# CPU 4-bit decoder (tests/kernels/test_nf4.py), `with torch.device("meta")` no longer reaches
# transformers' layers and a 7B model is allocated for real (the worker is killed for memory).
_BUILT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from cllora.model.load import tiny_config
from cllora.model.presets import preset_config
out = {}
for name in sys.argv[1:]:
    config = tiny_config(name[5:], 49152) if name.startswith("tiny-") else preset_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out[name] = sum(p.numel() for p in model.parameters())
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def built_counts() -> dict[str, int]:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _BUILT, *COUNTED], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", COUNTED)
def test_parameter_count_is_the_models(name, built_counts):
    """The sizes ``list models`` prints are those of the models built (on the meta device)."""
    from cllora.catalog import parameter_count
    from cllora.model.load import tiny_config
    from cllora.model.presets import preset_config

    config = tiny_config(name[5:], 49152) if name.startswith("tiny-") else preset_config(name)
    assert parameter_count(config) == built_counts[name]


def test_list_algorithms_reads_the_registry(capsys):
    from cllora.fed.algorithms import algorithm_names

    assert main(["list", "algorithms"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^(\w+) +\S", out, flags=re.M)
    assert listed[: len(algorithm_names())] == list(algorithm_names())
    assert re.search(r"^fedavg +\(McMahan et al., 2017\) on LoRA factors: A = sum_k", out,
                     flags=re.M)  # fmt: skip


def test_options_and_overrides_in_any_order(capsys):
    run = _parse(["run", "fed.rounds=1", "--resume", "runs/x", "progress=false"])
    assert (run.command, run.args, run.resume) == ("run", ["fed.rounds=1", "progress=false"],
                                                   "runs/x")  # fmt: skip
    sweep = _parse(["--debug", "sweep", "s.yaml", "seed=1", "--debug", "fed.rounds=2"])
    assert (sweep.sweep_file, sweep.args, sweep.debug) == ("s.yaml", ["seed=1", "fed.rounds=2"],
                                                           True)  # fmt: skip
    assert main(["config", "examples/demo.yaml", "--debug", "seed=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "rounds: 2" in out  # the file, then the override


def test_flower_options_and_overrides_in_any_order(tmp_path, capsys):
    pytest.importorskip("flwr")
    app = tmp_path / "app"
    assert main(["flower", "app", str(app), "--nodes", "3", "fed.rounds=4", "--secagg"]) == 0
    toml = (app / "pyproject.toml").read_text()
    assert 'overrides = "fed.rounds=4"' in toml and "nodes = 3" in toml
