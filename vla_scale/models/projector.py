"""The projector: concatenated per-patch encoder features -> LLM embedding space.

A stack of linear layers with an activation between them (LLaVA: 2 layers;
Prismatic's fused GELU MLP: 3; PaliGemma: 1 plus a 1/sqrt(hidden) scale).
The concatenation happens at the first layer; on CUDA with two encoders
(frozen first) `vla_scale.kernels.fused_concat_linear` computes it without
materialising the concatenated features: by default as two cuBLAS GEMMs into
one output (no GEMM for the frozen input's gradient), the Triton kernel or
torch's cat + linear where recorded (or measured) faster for the shape. It
never owns the encoders.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _activation(name: str | None):
    if name is None:
        return lambda x: x
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown projector activation {name!r}")


class Projector(nn.Module):
    def __init__(self, in_dims: Sequence[int], dims: Sequence[int], activation: str = "gelu",
                 post_scale: float = 1.0, fused_kernel: bool = True):
        super().__init__()
        if not dims:
            raise ValueError("a projector needs at least one layer")
        self.in_dims = [int(d) for d in in_dims]
        widths = [sum(self.in_dims), *[int(d) for d in dims]]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation = activation
        self.post_scale = float(post_scale)
        self.fused_kernel = fused_kernel
        self._act = _activation(activation)

    @property
    def out_dim(self) -> int:
        return self.layers[-1].out_features

    def describe(self) -> dict:
        return {"in_dims": self.in_dims, "dims": [l.out_features for l in self.layers],
                "activation": self.activation, "post_scale": self.post_scale}

    def _first_layer(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        first = self.layers[0]
        act_name = self.activation if len(self.layers) > 1 else None
        if (self.fused_kernel and len(features) == 2 and features[0].is_cuda
                and not features[0].requires_grad):
            from vla_scale.kernels import fused_concat_linear

            lead = features[0].shape[:-1]
            out = fused_concat_linear(features[0].reshape(-1, features[0].shape[-1]),
                                      features[1].reshape(-1, features[1].shape[-1]),
                                      first.weight, first.bias, activation=act_name)
            return out.view(*lead, -1)
        x = first(torch.cat(list(features), dim=-1) if len(features) > 1 else features[0])
        return self._act(x) if act_name else x

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if [f.shape[-1] for f in features] != self.in_dims:
            raise ValueError(f"projector expects feature widths {self.in_dims}, got {[f.shape[-1] for f in features]}")
        x = self._first_layer(features)
        for i, layer in enumerate(self.layers[1:], start=1):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self._act(x)
        return x * self.post_scale if self.post_scale != 1.0 else x

    @torch.no_grad()
    def split_first_weight_from(self, source_first: nn.Linear, copies: int) -> None:
        """Siamese init: W (out x D) -> [W/k | ... | W/k], so k identical encoders reproduce W x exactly."""
        w = source_first.weight
        if self.layers[0].weight.shape != (w.shape[0], w.shape[1] * copies):
            raise ValueError(f"cannot split a {tuple(w.shape)} weight over {copies} encoders "
                             f"into {tuple(self.layers[0].weight.shape)}")
        self.layers[0].weight.copy_(torch.cat([w / copies] * copies, dim=1))
        if source_first.bias is not None:
            self.layers[0].bias.copy_(source_first.bias)
        else:
            self.layers[0].bias.zero_()
