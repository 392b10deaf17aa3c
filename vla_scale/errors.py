"""The project's own exception types.

Every error a user can cause (a bad config, a missing checkpoint, a corrupt
shard, unparseable action text, a NaN loss) is raised as one of these, with a
message that says what was wrong, where, and what to do. The CLI prints the
message on one line and exits non-zero; it never shows a traceback for these.
"""
from __future__ import annotations


class VLAScaleError(Exception):
    """Base class of every error vla-scale raises on purpose."""


class ConfigError(VLAScaleError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(VLAScaleError):
    """A checkpoint or export folder is missing, incomplete or corrupt."""


class ModelLoadError(VLAScaleError):
    """A model, encoder or tokenizer folder cannot be loaded or does not fit the config."""


class TokenizerError(VLAScaleError, ValueError):
    """A tokenizer cannot represent actions (e.g. it has no single-digit tokens)."""


class ActionParseError(VLAScaleError, ValueError):
    """Action text or action token ids are malformed; the message names the position."""


class DataError(VLAScaleError, ValueError):
    """A dataset, sample or shard is malformed; the message names the file and sample."""


class TrainingError(VLAScaleError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss with `on_nonfinite: stop`)."""


class EvalError(VLAScaleError, RuntimeError):
    """An evaluation cannot go on (a simulator worker died, a policy returned a malformed action)."""


class LaunchError(VLAScaleError):
    """A job cannot be submitted: a malformed launch option, no `sbatch` on the PATH, or SLURM refused it."""


class PolicyServerError(VLAScaleError, RuntimeError):
    """A policy server cannot be reached or answered with something other than actions (`vla-scale serve`)."""
