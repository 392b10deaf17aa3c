"""Simulator evaluation: a simulator-independent backend interface (`backend`), tasks with
instructions and geometric success predicates (`tasks`), the built-in MuJoCo tabletop
(`mujoco_backend`) and its scripted experts (`experts`), and LIBERO / LIBERO-PRO
(`libero_backend`, with a scripted pick-and-place expert in `libero_expert`; the optional
`libero` extra). Perturbation suites of the tabletop, the parallel rollout runner, reports and
Isaac Gym are not implemented yet.

Importing this package never imports a simulator: `mujoco` is imported by `mujoco_backend` only,
and `libero` only when a LIBERO backend is built or a LIBERO suite's tasks are listed.
"""
