"""Simulator evaluation.

- `backend`: the simulator-independent interface (Backend, Episode, Observation, SceneView).
- `tasks`, `perturbations`: the built-in tasks and the MuJoCo tabletop's perturbation suites.
- `mujoco_backend` (built in), `libero_backend` (optional extra), `isaacgym_backend` (never run here).
- `experts`: scripted experts and their demonstrations as robot shards.
- `runner`: K environments in spawned processes, one batched policy call per step, open-loop chunks.
- `metrics`, `report`: Wilson intervals, variant aggregation, JSON/Markdown/PNG/GIF reports.
- `evaluate`: all of the above in one call (`vla-scale eval`).

Importing this package never imports a simulator.
"""
from vla_scale.eval.evaluate import evaluate

__all__ = ["evaluate"]
