"""``latency=profile:<file>@<run>`` typed on the command line exactly as docs/realtime.md writes it: Hydra's
override parser takes it unquoted, the eval's config carries it, and the latency model replays that run
(``#<run>``, which Hydra's parser rejects unquoted, still works where nothing parses it)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from parapolicy.realtime.latency import LatencyModel

DOCUMENTED = ("python -m parapolicy.eval timing=async "
              "latency=profile:outputs/gpu_check/latency_profile.json@paraddpm-6")


def write_profile(folder: Path) -> Path:
    path = folder / "outputs" / "gpu_check" / "latency_profile.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"runs": {"ddpm-6": {"latency_ms": [9.0, 9.5]},
                                         "paraddpm-6": {"latency_ms": [3.0, 3.5, 4.0]}}}))
    return path


def test_the_documented_profile_command_parses_and_replays_its_run(tmp_path, monkeypatch):
    assert DOCUMENTED in (Path(__file__).resolve().parent.parent / "docs" / "realtime.md").read_text()
    write_profile(tmp_path)
    monkeypatch.chdir(tmp_path)  # the path in the command is relative, as typed
    overrides = shlex.split(DOCUMENTED)[3:]  # what the shell hands to Hydra
    OverridesParser.create().parse_overrides(overrides)  # raised LexerNoViableAltException at '#'
    with initialize_config_module(config_module="parapolicy.conf", version_base=None):
        cfg = compose("eval", overrides=overrides)
    model = LatencyModel.parse(cfg.latency, "paraddpm", "paraddpm")  # neither label names a run of the file
    assert model.kind == "profile" and model.samples == [3.0, 3.5, 4.0]
    assert model.source.endswith("latency_profile.json#paraddpm-6")


def test_hash_separator_is_rejected_by_hydra_but_still_read(tmp_path):
    path = write_profile(tmp_path)
    with pytest.raises(Exception, match="(?i)lexer|parse|token"):
        OverridesParser.create().parse_overrides([f"latency=profile:{path}#paraddpm-6"])
    assert LatencyModel.parse(f"profile:{path}#paraddpm-6").samples == [3.0, 3.5, 4.0]
    with pytest.raises(ValueError, match=r"it has ddpm-6, paraddpm-6: pick one with latency=profile:.*@<run>"):
        LatencyModel.parse(f"profile:{path}", "other", "other")
    with pytest.raises(ValueError, match="has no run 'nope'"):
        LatencyModel.parse(f"profile:{path}@nope")
    odd = tmp_path / "run@2.json"  # a file whose name holds the separator is read whole
    odd.write_text(path.read_text())
    assert LatencyModel.parse(f"profile:{odd}", "ddpm-6").samples == [9.0, 9.5]
