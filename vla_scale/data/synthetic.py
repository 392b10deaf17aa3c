"""The built-in synthetic co-training set (for the demo, the tests and CI).

Every sample is an image with one coloured square on a noisy background:
- robot: "pick up the {colour} block" -> a 7-D action that depends on where
  the square is (delta xyz from its offset to the image centre, small
  rotations, gripper closed when it is in the left half), optionally a chunk;
- vqa: "What colour is the square?" -> the colour;
- spatial: "Is the square on the left or the right?" -> left/right (+ top/bottom);
- affordance: "Point to the square." -> "(x, y)" in [0, 1] image coordinates.
It is generated deterministically from a seed, so that it needs no download
and is identical on every machine. It is not a benchmark of anything.
"""
from __future__ import annotations

from typing import Any

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
VERBS = ("pick up", "push", "grasp", "move")


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, float, float]:
    img = rng.integers(90, 140, size=(size, size, 3), dtype=np.uint8)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    side = max(3, size // 5)
    x0, y0 = rng.integers(0, size - side, size=2)
    img[y0:y0 + side, x0:x0 + side] = COLOURS[colour]
    cx, cy = (x0 + side / 2) / size, (y0 + side / 2) / size
    return img, colour, float(cx), float(cy)


def _action(rng: np.random.Generator, cx: float, cy: float, colour: str, dim: int) -> np.ndarray:
    a = np.zeros(dim, dtype=np.float32)
    base = [(cx - 0.5) * 0.1, (cy - 0.5) * 0.1, 0.02 * (list(COLOURS).index(colour) - 1.5)]
    base += [0.05 * (cx - cy), 0.05 * (cx + cy - 1.0), 0.1 * (cy - 0.5)]
    for i in range(dim - 1):
        a[i] = base[i % len(base)] + rng.normal(0, 0.002)
    a[dim - 1] = 1.0 if cx < 0.5 else 0.0  # gripper: a 0/1 dimension, never normalised
    return a


def make_samples(task: str, n: int, *, seed: int, image_size: int = 32, action_dim: int = 7,
                 chunk: int = 1) -> list[dict[str, Any]]:
    """`n` samples of one task; the same (task, n, seed) always gives the same samples."""
    task_id = ("robot", "vqa", "spatial", "affordance").index(task)
    rng = np.random.default_rng([seed, task_id])
    out = []
    for i in range(n):
        img, colour, cx, cy = _scene(rng, image_size)
        if task == "robot":
            steps = [_action(rng, cx + 0.01 * t, cy, colour, action_dim) for t in range(chunk)]
            action = steps[0] if chunk == 1 else np.stack(steps)
            verb = VERBS[rng.integers(len(VERBS))]
            out.append({"task": task, "image": img, "instruction": f"{verb} the {colour} block",
                        "action": action, "episode": i, "step": 0})
        elif task == "vqa":
            out.append({"task": task, "image": img, "question": "What colour is the square?", "answer": colour})
        elif task == "spatial":
            h = "left" if cx < 0.5 else "right"
            v = "top" if cy < 0.5 else "bottom"
            out.append({"task": task, "image": img, "question": "Where is the square?", "answer": f"{v} {h}"})
        else:
            out.append({"task": task, "image": img, "question": "Point to the square.",
                        "answer": f"({cx:.2f}, {cy:.2f})"})
    return out
