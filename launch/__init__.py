"""SLURM submission, sbatch rendering and the per-node agent (`vla_scale.launch`).

Installed as `vla_scale.launch` (never a top-level `launch`).
- `vla_scale.launch.slurm`: check a run against the requested allocation,
  render a readable sbatch script into `<run>/slurm/`, submit it (or a chain
  of K jobs), and follow the jobs (`submit`, `render_sbatch`, `job_state`,
  `wait`); `vla-scale launch slurm` is its command line.
- `vla_scale.launch.agent`: torchrun with SIGUSR1 forwarded to its workers,
  which every node of a job runs.
- `slurm_local.sh` (in a checkout): a real one-node SLURM cluster on
  localhost, for developers and CI.
What a rank does on SIGUSR1/SIGTERM (stop at a step boundary, checkpoint,
requeue) lives with the trainer, in `vla_scale.train.preemption`; process-group
set-up, including elastic restarts, in `vla_scale.train.distributed`.
"""
from vla_scale.launch.slurm import SlurmOptions, SlurmSubmission, check, job_state, parse_time, render_sbatch, submit, wait

__all__ = ["SlurmOptions", "SlurmSubmission", "check", "job_state", "parse_time", "render_sbatch", "submit", "wait"]
