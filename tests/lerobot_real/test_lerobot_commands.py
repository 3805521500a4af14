"""LeRobot's own commands with the plugin installed: ``lerobot-eval --env.type=pusht`` with the plugin off and on,
and ``lerobot-rollout --inference.type=rtc`` on the pusht_gym test robot. Each command is bounded in time."""

from __future__ import annotations

import glob
import json

import numpy as np
import pytest

from builders import lerobot_bin, run

EVAL_TIMEOUT_S = 900  # ~15 s each on an idle 2-core box; minutes when the box is shared and loaded
EPISODES, EPISODE_LENGTH = 2, 60


@pytest.fixture(scope="module")
def evals(state_policy, lerobot_env, tmp_path_factory):
    """``lerobot-eval`` once per setting: {name: (actions per episode, eval_info metrics, output)}."""
    settings = {
        "off": {"PARAPOLICY_SAMPLER": "off"},
        "ddpm": {"PARAPOLICY_SAMPLER": "ddpm"},
        "paraddpm": {"PARAPOLICY_SAMPLER": "paraddpm", "PARAPOLICY_TOLERANCE": "1e-6"},
        # a tolerance no chunk misses: one Picard round, far from LeRobot's loop; proves the swap reaches it
        "loose": {"PARAPOLICY_SAMPLER": "paraddpm", "PARAPOLICY_TOLERANCE": "1e3"},
    }
    from pyarrow import parquet

    results = {}
    for name, knobs in settings.items():
        out = tmp_path_factory.mktemp(f"eval_{name}")
        proc = run([lerobot_bin("lerobot-eval"), f"--policy.path={state_policy}", "--env.type=pusht",
                    "--env.obs_type=environment_state_agent_pos", f"--env.episode_length={EPISODE_LENGTH}",
                    f"--eval.n_episodes={EPISODES}", f"--eval.batch_size={EPISODES}", "--eval.use_async_envs=false",
                    "--eval.recording=true", "--policy.device=cpu", f"--output_dir={out / 'run'}", "--seed=1000"],
                   dict(lerobot_env, **knobs), EVAL_TIMEOUT_S, out / "log.txt")
        assert proc.returncode == 0, proc.output[-4000:]
        files = sorted(glob.glob(str(out / "run" / "recordings" / "**" / "data" / "**" / "*.parquet"), recursive=True))
        actions = [np.array(parquet.read_table(f).column("action").to_pylist()) for f in files]
        metrics = json.loads((out / "run" / "eval_info.json").read_text())["per_task"][0]["metrics"]
        results[name] = (actions, metrics, proc.output)
    return results


def test_plugin_logs_what_it_swapped(evals):
    assert "PARAPOLICY_SAMPLER=off: nothing swapped" in evals["off"][2]
    assert "DiffusionModel.conditional_sample -> ddpm" in evals["ddpm"][2]
    assert "conditional_sample -> paraddpm (tolerance=1e-06" in evals["paraddpm"][2]


def test_sequential_swap_executes_lerobots_actions(evals):
    stock, stock_metrics, _ = evals["off"]
    ours, metrics, _ = evals["ddpm"]
    assert len(stock) == EPISODES and all(a.shape == (EPISODE_LENGTH, 2) for a in stock)
    assert all(np.array_equal(a, b) for a, b in zip(stock, ours))
    assert metrics["sum_rewards"] == stock_metrics["sum_rewards"]
    assert metrics["successes"] == stock_metrics["successes"]


def test_paraddpm_at_a_tight_tolerance_gives_the_same_episodes(evals):
    stock, stock_metrics, _ = evals["off"]
    ours, metrics, _ = evals["paraddpm"]
    # pixels of the 512 x 512 table; measured 3.4e-3 at most (docs/lerobot.md)
    assert all(np.abs(a - b).max() < 0.05 for a, b in zip(stock, ours))
    assert np.allclose(metrics["sum_rewards"], stock_metrics["sum_rewards"], rtol=1e-4, atol=1e-6)
    assert np.allclose(metrics["max_rewards"], stock_metrics["max_rewards"], rtol=1e-4, atol=1e-6)
    assert metrics["successes"] == stock_metrics["successes"]
    loose, _, _ = evals["loose"]  # the swap does reach lerobot-eval's policy
    assert max(np.abs(a - b).max() for a, b in zip(stock, loose)) > 1.0


def test_lerobot_rollout_rtc_runs_the_accelerated_policy(camera_policy, lerobot_env, tmp_path):
    log = tmp_path / "actions.jsonl"
    env = dict(lerobot_env, PARAPOLICY_SAMPLER="paraddpm", PARAPOLICY_TOLERANCE="1e-4")
    proc = run([lerobot_bin("lerobot-rollout"), "--strategy.type=base", f"--policy.path={camera_policy}",
                "--inference.type=rtc", "--inference.rtc.execution_horizon=8", "--robot.type=pusht_gym",
                "--robot.id=test", f"--robot.calibration_dir={tmp_path}", f"--robot.action_log={log}",
                "--fps=10", "--duration=40", "--device=cpu", "--play_sounds=false",
                "--return_to_initial_position=false", "--task="],
               env, 900, tmp_path / "rollout.txt")
    assert proc.returncode == 0, proc.output[-4000:]
    assert "predict_action_chunk takes RTC's inference_delay" in proc.output
    assert "RTC inference error" not in proc.output and "Fatal error in RTC thread" not in proc.output, proc.output[-4000:]
    executed = [json.loads(line)["action"] for line in log.read_text().splitlines()] if log.exists() else []
    # at least two chunks: the second one planned with the first one's left-over and the delay
    assert len(executed) >= 12, f"{len(executed)} actions executed in 40 s at 10 fps\n{proc.output[-3000:]}"
    assert np.isfinite(np.array(executed)).all()
