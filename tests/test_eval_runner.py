"""The rollout runner, metrics and reports: K worker processes give the same per-episode results as one,
chunks run open-loop, intervals are Wilson's, and a report is complete, valid and never half-written."""
import json
import os
import subprocess
import sys
from dataclasses import replace

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless offscreen rendering (llvmpipe)

import jsonschema
import numpy as np
import pytest
from PIL import Image

from vla_scale.errors import ConfigError, EvalError
from vla_scale.eval import evaluate
from vla_scale.eval.metrics import summarize, wilson
from vla_scale.eval.mujoco_backend import MujocoBackend
from vla_scale.eval.report import REPORT_SCHEMA
from vla_scale.eval.runner import (EpisodeResult, ExpertPolicy, ModelPolicy, RandomPolicy, RunTiming,
                                   run_episodes)


def _short(episodes, steps):
    return [replace(e, max_steps=steps) for e in episodes]


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("k, n, lo, hi", [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
                                          (3, 3, 0.4385, 1.0), (1, 20, 0.0089, 0.2361), (45, 50, 0.7864, 0.9565)])
def test_wilson_interval_matches_published_values(k, n, lo, hi):
    # Reference values to 4 decimals (0/10 -> [0, .2775] and 5/10 -> [.2366, .7634] are the commonly tabulated
    # ones); a normal-approximation or Clopper-Pearson interval would miss them (e.g. 0/10: [0, 0] or [0, .3085]).
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_covers_at_about_95_percent():
    rng = np.random.default_rng(0)
    for p in (0.1, 0.5, 0.8):
        k = rng.binomial(40, p, size=4000)
        covered = np.mean([lo <= p <= hi for lo, hi in (wilson(int(x), 40) for x in k)])
        assert 0.92 <= covered <= 0.98, (p, covered)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_variant_aggregation_weighs_every_variant_the_same():
    r = lambda task, variant, ok: EpisodeResult(task, variant, 0, 0, ok, 10, "x")  # noqa: E731
    results = ([r("a", "light", True)] * 9 + [r("a", "light", False)]  # 9/10
               + [r("a", "table", False)] * 2  # 0/2
               + [r("b", "light", True)] * 2 + [r("b", "table", True)] * 2)
    s = summarize(results, ["light", "table"])
    assert s["variants"]["light"]["rate"] == pytest.approx(11 / 12)
    assert s["variants"]["table"]["rate"] == pytest.approx(2 / 4)
    assert s["overall"]["variant_mean"] == pytest.approx((11 / 12 + 2 / 4) / 2)
    assert s["overall"]["rate"] == pytest.approx(13 / 16)  # pooled differs: the variants ran unequal counts
    assert s["tasks"]["a"]["variant_mean"] == pytest.approx((0.9 + 0.0) / 2)
    assert s["tasks"]["a"]["variants"]["table"]["ci95"] == pytest.approx(list(wilson(0, 2)))


# --------------------------------------------------------------------------- the runner


def test_k_processes_give_the_same_episodes_as_one_for_random_and_expert_policies():
    plan = MujocoBackend.plan("in_distribution", ["push", "stack"], 3, seed=5)
    short = _short(plan, 25)
    one = run_episodes("mujoco", short, RandomPolicy(1), envs=1, record=lambda e: e.index == 0)
    three = run_episodes("mujoco", short, RandomPolicy(1), envs=3, record=lambda e: e.index == 0)
    assert [r.outcome() for r in one] == [r.outcome() for r in three]
    assert [(r.task, r.seed) for r in one] == [(e.task, e.seed) for e in short]  # results in plan order
    for a, b in zip(one, three):  # recorded rollouts are the same to the pixel
        assert (a.frames is None) == (b.frames is None) == (a.index != 0)
        if a.frames:
            assert len(a.frames) == a.steps + 1
            np.testing.assert_array_equal(np.stack(a.frames), np.stack(b.frames))
    physics = {"cameras": ()}
    one = run_episodes("mujoco", plan, ExpertPolicy(), envs=1, backend_kwargs=physics)
    two = run_episodes("mujoco", plan, ExpertPolicy(), envs=2, backend_kwargs=physics)
    assert [r.outcome() for r in one] == [r.outcome() for r in two]
    assert all(r.success for r in one) and all(0 < r.steps < 200 for r in one)


def test_k_processes_give_the_same_episodes_as_one_for_an_exported_model(tiny_llava, tmp_path):
    from test_policy import _export
    from vla_scale.policy import VLAPolicy

    _export(tiny_llava, tmp_path / "export")
    policy = ModelPolicy(VLAPolicy.from_pretrained(tmp_path / "export", device="cpu"))
    plan = _short(MujocoBackend.plan("in_distribution", ["pick_place", "move_near"], 2, seed=0), 4)
    t1, t3 = RunTiming(), RunTiming()
    one = run_episodes("mujoco", plan, policy, envs=1, timing=t1, record=lambda e: True)
    three = run_episodes("mujoco", plan, policy, envs=3, timing=t3, record=lambda e: True)
    assert [r.outcome() for r in one] == [r.outcome() for r in three]
    for a, b in zip(one, three):
        np.testing.assert_array_equal(np.stack(a.frames), np.stack(b.frames))
    assert len({r.frames[-1].tobytes() for r in one}) > 1  # the model moved the gripper differently per episode
    # Batched: three environments share each policy call.
    assert t1.policy_rows == t1.policy_calls == 16
    assert t3.policy_rows == 16 and t3.policy_calls < 16


class _Script:
    """Replays fixed action sequences (one per task), as chunks of T or one action at a time."""

    def __init__(self, chunk: int | None) -> None:
        self.chunk, self.name, self.calls = chunk, "script", 0
        rng = np.random.default_rng(0)
        self.actions = np.concatenate([rng.uniform(-0.02, 0.02, (40, 6)), (rng.random((40, 1)) > 0.5)], axis=1)

    def act(self, observations, episodes, steps):
        self.calls += 1
        if self.chunk is None:
            return [self.actions[t] for t in steps]
        return [self.actions[t:t + self.chunk] for t in steps]


def test_action_chunks_run_open_loop_and_execute_caps_them():
    plan = _short(MujocoBackend.plan("in_distribution", ["push"], 1, seed=3), 12)
    single, chunked, capped = _Script(None), _Script(4), _Script(4)
    a = run_episodes("mujoco", plan, single, record=lambda e: True)[0]
    b = run_episodes("mujoco", plan, chunked, record=lambda e: True)[0]
    c = run_episodes("mujoco", plan, capped, execute=3, record=lambda e: True)[0]
    assert (single.calls, chunked.calls, capped.calls) == (12, 3, 4)  # 12 steps: 12, 12/4 and 12/3 calls
    for other in (b, c):  # the same actions reached the simulator in the same order
        assert other.outcome() == a.outcome()
        np.testing.assert_array_equal(np.stack(other.frames), np.stack(a.frames))


def test_a_malformed_action_or_a_bad_backend_is_our_error_naming_where():
    plan = _short(MujocoBackend.plan("in_distribution", ["push"], 1, seed=0), 5)

    class Broken:
        name = "broken"

        def act(self, observations, episodes, steps):
            return [np.full(5, np.nan) for _ in observations]

    with pytest.raises(EvalError, match=r"episode push/none/0: the policy returned \(5,\)"):
        run_episodes("mujoco", plan, Broken(), envs=2)
    with pytest.raises(ConfigError, match="image_size must be 128 or 224"):  # raised in the worker, named
        run_episodes("mujoco", plan, RandomPolicy(), envs=2, backend_kwargs={"image_size": 100})
    with pytest.raises(ConfigError, match="unknown evaluation backend 'gazebo'"):
        run_episodes("gazebo", plan, RandomPolicy())
    with pytest.raises(ConfigError, match="unknown mujoco task"):
        MujocoBackend.plan("in_distribution", ["fly"], 1, 0)


# --------------------------------------------------------------------------- reports


def test_a_short_random_evaluation_writes_a_valid_report_with_chart_and_gifs(tmp_path):
    out = tmp_path / "report"
    report = evaluate(policy="random", suite="in_distribution", episodes=2, envs=2, seed=7, out=out, gifs=1,
                      max_steps=20, progress=False)
    data = json.loads((out / "report.json").read_text())
    jsonschema.validate(data, REPORT_SCHEMA)
    assert data["summary"] == report["summary"]
    assert data["meta"]["tasks"] == ["pick_place", "push", "move_near", "stack"] and data["meta"]["max_steps"] == 20
    assert len(data["episodes"]) == 8 and all(e["steps"] == 20 for e in data["episodes"])
    assert data["summary"]["overall"]["n"] == 8
    with Image.open(out / data["files"]["chart"]) as chart:
        assert chart.format == "PNG" and chart.width > 300
    assert len(data["files"]["gifs"]) == 4  # one per task: the episodes with index 0
    for rel in data["files"]["gifs"]:
        with Image.open(out / rel) as gif:
            assert gif.format == "GIF" and gif.n_frames == 11  # 21 observations, every 2nd
    md = (out / "report.md").read_text()
    assert "| pick_place |" in md and "success.png" in md and "Wilson" in md
    # An existing report is never replaced unless asked, and stays whole when refused.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="exists and is not empty"):
        evaluate(policy="random", suite="in_distribution", episodes=1, out=out, max_steps=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folders left behind


def test_the_cli_evaluates_and_prints_where_the_report_is(tmp_path):
    cmd = [sys.executable, "-m", "vla_scale.cli", "eval", "--policy", "expert", "--task", "push,stack",
           "--episodes", "2", "--envs", "2", "--out", str(tmp_path / "ev"), "--gifs", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "success 100.0%" in done.stdout and f"report: {tmp_path / 'ev' / 'report.md'}" in done.stdout
    assert "ep/s" in done.stderr or "ep]" in done.stderr  # the progress bar
    bad = subprocess.run([sys.executable, "-m", "vla_scale.cli", "eval", "--policy", "random", "--suite", "mars"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown mujoco suite 'mars'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_worker_that_dies_mid_run_is_an_error_naming_it_and_no_process_is_left_behind():
    import multiprocessing
    import signal

    plan = _short(MujocoBackend.plan("in_distribution", None, 2, seed=0), 15)
    killed = []

    def kill_one(result):
        if not killed:
            victim = multiprocessing.active_children()[0]
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

    with pytest.raises(EvalError, match=r"evaluation worker \d died \(exit code -9\)"):
        run_episodes("mujoco", plan, RandomPolicy(), envs=2, progress=kill_one)
    assert killed and multiprocessing.active_children() == []


def test_wilson_interval_is_exact_at_the_ends_and_always_holds_the_estimate():
    for n in range(1, 60):
        assert wilson(n, n)[1] == 1.0 and wilson(0, n)[0] == 0.0
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
