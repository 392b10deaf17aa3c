"""Simulator evaluation: a simulator-independent backend interface (`backend`), tasks with
instructions and geometric success predicates (`tasks`), the built-in MuJoCo tabletop
(`mujoco_backend`) and its scripted experts (`experts`). Perturbation suites, the parallel
rollout runner, reports, LIBERO and Isaac Gym are not implemented yet.

Importing this package never imports a simulator: `mujoco` is imported by `mujoco_backend` only.
"""
