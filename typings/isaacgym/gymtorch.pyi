# The project's own stub for Isaac Gym's gymtorch module (the isaacgym-stubs package holds gymapi only).
# Written from gymtorch's Python source in Isaac Gym Preview 4: wrap_tensor views a gym tensor descriptor as a
# torch tensor sharing its memory; unwrap_tensor describes a contiguous torch tensor to the gym API.
#
# This folder has no __init__.pyi on purpose: `isaacgym` stays a namespace package here, so pyright resolves
# `isaacgym.gymtorch` to this file and still finds `isaacgym.gymapi` in isaacgym-stubs. That works for
# `import isaacgym.gymapi as gymapi` but not for `from isaacgym import gymapi` (pyright then looks for gymapi only
# in this folder), which is why vla_scale/eval/isaacgym_backend.py imports the modules in the first form.
from typing import Sequence

import isaacgym.gymapi as gymapi
import torch

def wrap_tensor(gym_tensor: gymapi.Tensor, offsets: Sequence[int] | None = None,
                counts: Sequence[int] | None = None) -> torch.Tensor: ...
def unwrap_tensor(torch_tensor: torch.Tensor) -> gymapi.Tensor: ...
