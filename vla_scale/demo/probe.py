"""Feature retention: a linear probe of object colour and shape on rendered crops of the tabletop.

The paper measures how much of the VLM's visual knowledge survives VLA
training by probing vision features (its vision features go from 67 to 83
with the frozen copy). Here: crops centred on each object of rendered
scenes (training colours and cubes, plus the `novel_objects` variant's
unseen colours, cylinders and spheres), each encoder's patch features
mean-pooled over the crop, and a multinomial logistic regression trained on
the crops of some scenes and scored on the crops of other scenes. Labels
come from the simulator, never from pixels.

Encoders compared: the source VLM's tower after its VLM stage (what the
frozen copy keeps, by construction identical to it), the VLA's trained copy
after fine-tuning, and the random initialisation (a floor).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

CROP = 0.25  # crop side as a share of the image side (a 4 cm block spans about 8% of the 128 px view)


@dataclass
class ProbeSet:
    crops: np.ndarray  # uint8 (N, S, S, 3)
    colour: np.ndarray  # int labels
    shape: np.ndarray
    scene: np.ndarray  # which scene each crop came from (train/test split by scene)
    colours: list[str]
    shapes: list[str]


def render_probe_set(scenes: int, seed: int, *, image_size: int = 128, task: str = "pick_place") -> ProbeSet:
    """Crops around every object of `scenes` scenes (half unperturbed, half `novel_objects`)."""
    from PIL import Image

    from vla_scale.eval.mujoco_backend import MujocoBackend
    from vla_scale.eval.scene_qa import project

    crops, colours, shapes, scene_ids = [], [], [], []
    colour_names: list[str] = []
    shape_names = ["box", "cylinder", "sphere"]
    side = int(round(CROP * image_size))
    with MujocoBackend(cameras=("primary",), image_size=image_size) as backend:
        for k in range(scenes):
            variant = "novel_objects" if k % 2 else None
            obs = backend.reset(task, seed + k, variant)
            view = backend.scene()
            img = obs.images["primary"]
            names = list(view.objects)
            uv = project(backend, np.stack([view.objects[n] for n in names]) + [0.0, 0.0, view.object_half])
            pad = np.pad(img, ((side, side), (side, side), (0, 0)), mode="edge")
            for i, name in enumerate(names):
                x, y = (uv[i] * image_size).astype(int) + side
                crop = pad[y - side // 2:y - side // 2 + side, x - side // 2:x - side // 2 + side]
                crops.append(np.asarray(Image.fromarray(crop)))
                if name not in colour_names:
                    colour_names.append(name)
                colours.append(colour_names.index(name))
                shapes.append(shape_names.index(backend._object_shapes[i]))
                scene_ids.append(k)
    return ProbeSet(np.stack(crops), np.array(colours), np.array(shapes), np.array(scene_ids), colour_names,
                    shape_names)


@torch.no_grad()
def pooled_features(encode: Callable[[torch.Tensor], torch.Tensor], crops: np.ndarray, size: int,
                    batch: int = 128) -> torch.Tensor:
    """Mean-pooled patch features (N, C) of uint8 crops resized to `size` (the encoder's input side)."""
    from vla_scale.data.images import to_pixels

    out = []
    for k in range(0, len(crops), batch):
        x = torch.stack([to_pixels(c, size) for c in crops[k:k + batch]])
        out.append(encode(x).float().mean(dim=1))
    return torch.cat(out)


def linear_probe(features: torch.Tensor, labels: np.ndarray, train: np.ndarray, *, steps: int = 300,
                 weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression (standardised features, L-BFGS)."""
    torch.manual_seed(seed)
    y = torch.as_tensor(labels)
    tr, te = torch.as_tensor(train), torch.as_tensor(~train)
    mu, sd = features[tr].mean(0), features[tr].std(0) + 1e-6
    x = (features - mu) / sd
    classes = int(y.max()) + 1
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[tr] @ w + b, y[tr]) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((x[te] @ w + b).argmax(1) == y[te]).float().mean())


def probe_encoders(encoders: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]], data: ProbeSet,
                   *, train_share: float = 0.7) -> dict[str, dict[str, float]]:
    """{encoder: {"colour": acc, "shape": acc, "mean": ...}} for encoders given as (encode(uint8 images), size)."""
    scenes = np.unique(data.scene)
    train = np.isin(data.scene, scenes[: max(1, int(len(scenes) * train_share))])
    out = {}
    for name, (encode, size) in encoders.items():
        f = pooled_features(encode, data.crops, size)
        colour, shape = linear_probe(f, data.colour, train), linear_probe(f, data.shape, train)
        out[name] = {"colour": colour, "shape": shape, "mean": (colour + shape) / 2}
    return out


def model_towers(model: Any) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """Every vision encoder of a built VLA (frozen and trained), each as (encode(uint8 images), input side)."""
    size = int(model.image_size)
    encoders = list(model.frozen.encoders.items()) + list(model.core.encoders.items())
    return {name: (enc.eval(), size) for name, enc in encoders}


def source_towers(model_config: Any) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """The source VLM's tower(s) as the VLA reads them (same layer, same normalisation), built through the
    usual loading path from a model config."""
    from vla_scale.models.loading import build_vla

    model, _ = build_vla(model_config)
    return model_towers(model)


def export_towers(export: str) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """Every vision encoder of an exported VLA (frozen and trained), each as encode(uint8 images)."""
    from vla_scale.policy import VLAPolicy

    return model_towers(VLAPolicy.from_pretrained(export, device="cpu").model)
