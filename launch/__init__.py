"""SLURM submission, sbatch rendering and elastic/rendezvous environment handling (`vla_scale.launch`).

Installed as `vla_scale.launch` (never a top-level `launch`). Not implemented yet: today a run is
launched with `torchrun ... -m vla_scale.cli train CONFIG` (see the README); process-group set-up
for torchrun, including elastic restarts, lives in `vla_scale.train.distributed`.
"""
