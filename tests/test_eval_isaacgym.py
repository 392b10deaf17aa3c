"""The Isaac Gym backend, without Isaac Gym (it cannot be installed here; the backend has never run for real).

What is checked: pyright finds no error in the backend against the isaacgym-stubs package (gymapi) and the
project's gymtorch stub, and does find a misspelled call, a missing argument, a wrong argument type, a
misspelled constant and a gymtorch misuse in copies of it (so the check has teeth); constructing it without
isaacgym is a ConfigError that says how to get it; importing it imports no simulator and no torch; its
suites, tasks and plans are the MuJoCo backend's; and `layout.sample_layout`, from which it builds each
scene, is exactly the scene and instruction the MuJoCo backend resets to.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_scale.errors import ConfigError
from vla_scale.eval.backend import Backend
from vla_scale.eval.isaacgym_backend import IsaacGymBackend
from vla_scale.eval.layout import sample_layout
from vla_scale.eval.mujoco_backend import MujocoBackend
from vla_scale.eval.tasks import TASKS

ROOT = Path(__file__).resolve().parents[1]
BACKEND = ROOT / "vla_scale" / "eval" / "isaacgym_backend.py"
PYRIGHT_TIMEOUT = 300  # seconds; a warm run takes about 4 s


def _pyright(*args: str, cwd: Path = ROOT) -> dict:
    if importlib.util.find_spec("pyright") is None:
        pytest.fail("pyright is not installed: install the test extra (bash install.sh --test)")
    env = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}  # no version check against PyPI
    proc = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable,
                           "-p", str(ROOT / "pyrightconfig.json"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=PYRIGHT_TIMEOUT)
    try:  # pyright may print a line of its own after the JSON (e.g. about a missing venv)
        return json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0]
    except (ValueError, json.JSONDecodeError):
        pytest.fail(f"pyright gave no JSON (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")


def _errors(report: dict) -> list[dict]:
    return [d for d in report["generalDiagnostics"] if d["severity"] == "error"]


def test_pyright_finds_no_error_in_the_backend_and_checks_only_it():
    report = _pyright()
    assert report["summary"]["filesAnalyzed"] == 1
    assert _errors(report) == [], json.dumps(_errors(report), indent=1)
    # Every isaacgym name resolved (an unresolved import would make the whole check vacuous).
    assert not [d for d in report["generalDiagnostics"] if d.get("rule") == "reportMissingImports"]


# (name, exact text in the backend, replacement, a word pyright's error must contain)
MUTATIONS = [
    ("misspelled_gym_call", "gym.refresh_dof_state_tensor(sim)", "gym.refresh_dof_state_tensr(sim)",
     "refresh_dof_state_tensr"),
    ("missing_argument", "gymtorch.unwrap_tensor(index_tensor), len(indices))",
     "gymtorch.unwrap_tensor(index_tensor))", "arg3"),
    ("wrong_argument_type", "gym.create_env(sim, gymapi.Vec3(-0.5, -0.5, -0.1)",
     "gym.create_env(sim, (-0.5, -0.5, -0.1)", "Vec3"),
    ("misspelled_constant", "gymapi.UP_AXIS_Z", "gymapi.UP_AXIS_ZZ", "UP_AXIS_ZZ"),
    ("torch_tensor_into_wrap_tensor", "gymtorch.wrap_tensor(raw)", "gymtorch.wrap_tensor(self._root)",
     "wrap_tensor"),
]


def test_pyright_catches_misspelled_calls_and_wrong_arguments_in_copies_of_the_backend(tmp_path):
    source = BACKEND.read_text()
    (tmp_path / "unchanged.py").write_text(source)
    for name, old, new, _ in MUTATIONS:
        assert source.count(old) == 1, f"{name}: the text to mutate is not in the backend exactly once"
        (tmp_path / f"{name}.py").write_text(source.replace(old, new))
    report = _pyright(*sorted(str(p) for p in tmp_path.glob("*.py")), cwd=tmp_path)
    by_file: dict[str, list[str]] = {}
    for d in _errors(report):
        by_file.setdefault(Path(d["file"]).stem, []).append(d["message"])
    assert "unchanged" not in by_file, by_file.get("unchanged")
    for name, _, _, word in MUTATIONS:
        messages = by_file.get(name, [])
        assert len(messages) == 1 and word in messages[0], (name, messages)


def test_without_isaacgym_construction_is_a_config_error_saying_how_to_get_it():
    if importlib.util.find_spec("isaacgym") is not None:
        pytest.skip("isaacgym is installed here")
    with pytest.raises(ConfigError) as info:
        IsaacGymBackend()
    message = str(info.value)
    for needed in ("not installed", "not on any package registry", "Isaac Gym Preview 4", "NVIDIA",
                   "pip install -e isaacgym/python", "Python 3.6, 3.7 or 3.8", "imported before torch",
                   "never been run against a real Isaac Gym"):
        assert needed in message, (needed, message)


def test_isaacgym_found_after_torch_is_a_config_error_about_the_import_order(tmp_path, monkeypatch):
    # A stand-in package that only has to be findable: the order is checked before anything is imported.
    (tmp_path / "isaacgym").mkdir()
    (tmp_path / "isaacgym" / "__init__.py").write_text("raise AssertionError('must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import torch  # noqa: F401  (conftest has imported it already; be explicit)

    assert "isaacgym" not in sys.modules
    with pytest.raises(ConfigError, match="isaacgym must be imported before torch"):
        IsaacGymBackend(cameras=())
    assert "isaacgym" not in sys.modules


def test_importing_the_backend_imports_no_simulator_and_no_torch():
    code = ("import sys, vla_scale.eval.isaacgym_backend as m; "
            "bad = [n for n in ('isaacgym', 'torch', 'mujoco') if n in sys.modules]; "
            "assert not bad, bad; print(m.IsaacGymBackend.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "isaacgym", out.stderr


def test_suites_tasks_and_plans_are_the_mujoco_backends_without_a_simulator():
    assert issubclass(IsaacGymBackend, Backend) and IsaacGymBackend.name == "isaacgym"
    assert IsaacGymBackend.suites() == MujocoBackend.suites()
    for suite in MujocoBackend.suites():
        assert IsaacGymBackend.tasks(suite) == MujocoBackend.tasks(suite)
        assert IsaacGymBackend.plan(suite, None, 2, 7) == MujocoBackend.plan(suite, None, 2, 7)
    for task in TASKS:
        assert IsaacGymBackend.episode_length(task) == MujocoBackend.episode_length(task)
    plan = IsaacGymBackend.plan("in_distribution", ["stack"], 3, 10)
    assert [(e.task, e.variant, e.seed, e.index) for e in plan] == [("stack", "none", 10 + i, i) for i in range(3)]
    with pytest.raises(ConfigError, match="unknown isaacgym suite"):
        IsaacGymBackend.plan("no_such_suite", None, 1, 0)


def test_the_shared_layout_is_the_scene_and_instruction_the_mujoco_backend_resets_to():
    with MujocoBackend(cameras=()) as mujoco:
        for task in sorted(TASKS):
            for seed in range(8):
                layout = sample_layout(task, seed)
                obs = mujoco.reset(task, seed)
                view = mujoco.scene()
                assert obs.instruction == layout.instruction and view.goal == layout.goal
                assert list(view.objects) == list(layout.object_colours)
                for i, name in enumerate(layout.object_colours):
                    np.testing.assert_allclose(view.objects[name][:2], layout.object_xy[i], atol=1e-3)
                assert set(view.pads) == set(layout.pads())
                for name, pad in layout.pads().items():
                    np.testing.assert_allclose(view.pads[name].center, pad.center)
                    assert view.pads[name].half == pad.half


FAKE_RUN = r"""
import json, sys
import numpy as np
from vla_scale.errors import ConfigError
from vla_scale.eval.isaacgym_backend import IsaacGymBackend
from vla_scale.eval.layout import sample_layout
from vla_scale.eval.mujoco_backend import OBJECT_HALF, TABLE_Z

backend = IsaacGymBackend(cameras=("primary", "wrist"), gpu_pipeline=False)
from isaacgym import gymapi
out = {"torch_after": "torch" in sys.modules}
obs = backend.reset("pick_place", 3)
layout = sample_layout("pick_place", 3)
view = backend.scene()
out["first"] = {
    "images": {k: list(v.shape) for k, v in obs.images.items()},
    "state": obs.state.tolist(),
    "instruction_matches": obs.instruction == layout.instruction,
    "placed": all(np.allclose(view.objects[n], [*layout.object_xy[i], TABLE_Z + OBJECT_HALF], atol=1e-6)
                  for i, n in enumerate(layout.object_colours)),
}
expert = backend.expert()
top, offsets, steps = 0.0, [], 0
for steps in range(200):
    action, done = expert.act()
    if done:
        break
    backend.step(action)
    v = backend.scene()
    if v.held is not None:  # an attached cube keeps its offset from the grasp point and rises with the gripper
        top = max(top, float(v.objects[v.held][2]))
        offsets.append(v.objects[v.held] - v.ee_pos)
spread = float(np.ptp(np.array(offsets), axis=0).max()) if offsets else 1.0
out["pick_place"] = {"success": backend.success(), "steps": steps, "top": top, "held_steps": len(offsets),
                     "offset_spread": spread}
for task in ("stack", "move_near"):
    from vla_scale.eval.experts import run_expert
    out[task] = run_expert(backend, task, 5)
try:
    backend.reset("pick_place", 0, "lighting")
    out["perturbation"] = "no error"
except ConfigError as e:
    out["perturbation"] = str(e)
backend.close()
out["destroyed"] = gymapi.acquire_gym().calls[-1] == ("destroy_sim",)
print("RESULT" + json.dumps(out))
"""


def test_the_backends_own_logic_runs_end_to_end_on_a_physics_free_stand_in_for_isaacgym():
    """tests/fake_isaacgym is a stand-in for gymapi/gymtorch with no physics (nothing moves unless written). On it
    the backend's own code runs: scene layout, cameras, teleported gripper and attached grasp, tensor indexing.
    The experts' pick-and-place, stack and move-near need only that (released cubes stay where they are let go,
    4 mm up, within the predicates' tolerance); pushing needs contacts, so it is not run here. This says nothing
    about Isaac Gym's own behaviour."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_isaacgym"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", FAKE_RUN], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["torch_after"]
    first = out["first"]
    assert first["images"] == {"primary": [128, 128, 3], "wrist": [128, 128, 3]}
    assert first["instruction_matches"] and first["placed"]
    assert np.allclose(first["state"], [0, 0, 0.2, 1, 0, 0, 0, 1], atol=1e-6)  # home, upright, fingers open
    pick = out["pick_place"]
    assert pick["success"] and pick["held_steps"] > 10 and pick["top"] > 0.1 and pick["offset_spread"] < 1e-5, pick
    assert out["stack"] and out["move_near"]
    assert "implemented only in the MuJoCo backend" in out["perturbation"]
    assert out["destroyed"]
