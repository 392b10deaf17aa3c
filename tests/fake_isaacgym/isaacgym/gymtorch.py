"""Stand-in gymtorch: a gym tensor here is a holder of a torch tensor (wrap and unwrap share memory, as for real)."""
import torch  # after gymapi, as the real gymtorch does

from isaacgym import gymapi


def wrap_tensor(gym_tensor, offsets=None, counts=None):
    assert isinstance(gym_tensor, gymapi.Tensor), type(gym_tensor)
    return gym_tensor.torch


def unwrap_tensor(torch_tensor):
    assert isinstance(torch_tensor, torch.Tensor) and torch_tensor.is_contiguous()
    return gymapi.Tensor(torch_tensor)
