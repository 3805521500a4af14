"""The episode log (``episodes.jsonl``): resume keeps complete lines only, relabels older labels, and
appends from several threads stay whole lines."""

from __future__ import annotations

import json
import threading

from parapolicy.evaluation.episode_log import EpisodeLog, read_episodes, summarize
from parapolicy.evaluation.runs import RunSpec


def record(seed: int, success: bool, latencies=(10.0, 30.0)) -> dict:
    calls = [{"latency_ms": ms, "rounds": 4, "model_evals": 16, "converged": True} for ms in latencies]
    return {"seed": seed, "success": success, "length": 5, "reward": 0.0, "error": None, "calls": calls, "wall_s": 1.0}


def test_resume_keeps_complete_lines_and_drops_a_cut_one(tmp_path):
    path = tmp_path / "episodes.jsonl"
    whole = [{"run": "ddpm", "episode": e, **record(100 + e, True)} for e in range(2)]
    path.write_text("".join(json.dumps(line) + "\n" for line in whole) + '{"run": "ddpm", "episo')  # cut mid-line
    with EpisodeLog(path, resume=True) as log:
        assert log.done() == {("ddpm", 0), ("ddpm", 1)}
        log.append("ddpm", 2, record(102, False))
    lines = path.read_text().splitlines()
    assert [json.loads(line)["episode"] for line in lines] == [0, 1, 2]  # the cut line is gone, not glued
    assert read_episodes(path)[2]["success"] is False


def test_without_resume_the_log_starts_empty(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"run": "ddpm", "episode": 0, **record(100, True)}) + "\n")
    with EpisodeLog(path, resume=False) as log:
        assert log.done() == set()
    assert path.read_text() == ""


def test_resume_renames_lines_of_the_older_label_scheme(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"run": "ddim", "episode": 0, **record(100, True)}) + "\n")
    specs = [RunSpec("paraddim", "paraddim", 15, {}, "sampler", legacy_label="paraddim"),
             RunSpec("ddim-15", "ddim", 15, {}, "baseline", legacy_label="ddim")]
    with EpisodeLog(path, resume=True, specs=specs) as log:
        assert log.done() == {("ddim-15", 0)}
    assert json.loads(path.read_text())["run"] == "ddim-15"


def test_appends_from_threads_are_whole_lines(tmp_path):
    path = tmp_path / "episodes.jsonl"
    with EpisodeLog(path, resume=False) as log:
        def robot(k: int) -> None:
            for e in range(k, 200, 4):
                log.append("paraddpm@server", e, record(100 + e, e % 3 == 0, latencies=[float(e)] * 20))

        threads = [threading.Thread(target=robot, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    episodes = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(ep["episode"] for ep in episodes) == list(range(200))
    assert all(ep["calls"][0]["latency_ms"] == ep["episode"] for ep in episodes)
    assert len(log.of_run("paraddpm@server", range(10, 20))) == 10


def test_summarize_gives_each_run_and_the_speedup_over_the_first_baseline():
    episodes = [{"run": "paraddpm", "episode": e, **record(e, True, latencies=(10.0, 20.0))} for e in range(3)]
    episodes += [{"run": "ddpm", "episode": e, **record(e, e != 1, latencies=(40.0, 40.0))} for e in range(3)]
    specs = [RunSpec("paraddpm", "paraddpm", 100, {"window": 16}, "sampler"), RunSpec("ddpm", "ddpm", 100, {}, "baseline")]
    summary = summarize(episodes, ["paraddpm", "ddpm"], "ddpm", specs)
    assert summary["runs"]["ddpm"]["n_success"] == 2 and summary["runs"]["paraddpm"]["n_success"] == 3
    assert summary["runs"]["paraddpm"]["options"] == {"window": 16} and summary["runs"]["ddpm"]["role"] == "baseline"
    assert summary["speedup_p50"] == 40.0 / 15.0


def test_an_image_policy_summary_carries_the_encoder_share():
    from parapolicy.evaluation.metrics import format_table

    line = {"run": "ddpm", "episode": 0, **record(0, True, latencies=(100.0, 120.0))}
    for call, encode in zip(line["calls"], (20.0, 30.0)):
        call["encode_ms"] = encode
    runs = summarize([line], ["ddpm"], None)["runs"]
    assert runs["ddpm"]["encode_ms"]["p50"] == 25.0
    assert "image encoder p50 25.0 ms of the p50 call's 110.0 ms" in format_table(runs)
    plain = summarize([{"run": "ddpm", "episode": 0, **record(0, True)}], ["ddpm"], None)["runs"]
    assert "encode_ms" not in plain["ddpm"] and "encoder" not in format_table(plain)
