"""Simulator evaluation.

- `backend`: the simulator-independent interface (Backend, Episode, Observation, SceneView).
- `tasks`, `perturbations`: the built-in tasks and the MuJoCo tabletop's perturbation suites.
- `mujoco_backend` (built in), `libero_backend` (LIBERO / LIBERO-PRO, the optional `libero` extra,
  with a scripted pick-and-place expert in `libero_expert`), `isaacgym_backend` (never run here).
- `experts`: scripted experts and their demonstrations as robot shards; `scene_qa`: questions about
  the tabletop's rendered scenes, answered from the simulator.
- `runner`: K environments in spawned processes, one batched policy call per step, open-loop chunks.
- `metrics`, `report`: Wilson intervals, variant aggregation, JSON/Markdown/PNG/GIF reports.
- `evaluate`: all of the above in one call (`vla-scale eval`).

Importing this package never imports a simulator: `mujoco` is imported when a MuJoCo backend is
built, `libero` only when a LIBERO backend is built or a LIBERO suite's tasks are listed.
"""
from vla_scale.eval.evaluate import evaluate

__all__ = ["evaluate"]
