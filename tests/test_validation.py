"""Validation on held-out data: action error against the mean-action baseline, and vision reliance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vla_scale.data.camera_images import decode_camera_image
from vla_scale.errors import ConfigError
from vla_scale.train.metrics import read_metrics
from vla_scale.train.trainer import Trainer

VAL = "data.val_sources=[{name: robot, path: synthetic}, {name: vqa, path: synthetic}]"


def _trainer(tiny_config, *extra):
    trainer = Trainer(tiny_config("train.steps=2", "train.checkpoint_every=0", "data.val_samples=6", VAL, *extra))
    trainer._build()
    return trainer


def test_validation_reports_action_error_beside_the_baseline_and_the_reliance_gap(tiny_config):
    trainer = _trainer(tiny_config, "train.val_every=1")
    v = trainer.validator
    row = v.run(trainer.model, trainer.strategy.device)
    for key in ("val/loss/robot", "val/loss/vqa", "val/l1/robot", "val/l1_baseline/robot", "val/gripper_acc/robot",
                "val/gripper_acc_baseline/robot", "val/reliance/robot/loss_gap", "val/reliance/robot/l1_gap"):
        assert key in row and np.isfinite(row[key]), key
    assert {f"val/l1/robot/d{k}" for k in range(6)} <= set(row)  # every continuous dimension; d6 is the gripper
    # The baseline, recomputed here from the statistics and the held-out targets' own tokens.
    at = trainer.action_tokenizer
    targets = np.stack([at.decode([t for t in s["labels"] if t != -100]) for s in v.samples["robot"]])
    mean = np.asarray(v.normalizers["robot"].normalize(np.asarray(trainer.stats["robot"]["mean"])))
    assert row["val/l1_baseline/robot"] == pytest.approx(float(np.abs(mean[:6] - targets[:, :6]).mean()))
    grip = targets[:, 6] > 0.5
    assert row["val/gripper_acc_baseline/robot"] == pytest.approx(max(grip.mean(), 1 - grip.mean()))


def test_a_model_that_ignores_the_image_shows_no_reliance_gap(tiny_config):
    trainer = _trainer(tiny_config, "train.val_every=1")
    model = trainer.model
    seeing = trainer.validator.run(model, trainer.strategy.device)
    blind = model.core.image_tokens
    model.core.image_tokens = lambda images, feats: torch.zeros_like(blind(images, feats))
    try:
        row = trainer.validator.run(model, trainer.strategy.device)
    finally:
        del model.core.image_tokens
    assert row["val/reliance/robot/loss_gap"] == 0.0 and row["val/reliance/robot/l1_gap"] == 0.0
    assert seeing["val/reliance/robot/loss_gap"] != 0.0  # with its eyes open the same model's loss moves


def test_validation_changes_nothing_about_training(tiny_config, tmp_path):
    plain = Trainer(tiny_config("train.steps=4", "train.checkpoint_every=0", f"run.output_dir={tmp_path / 'a'}",
                                VAL)).fit(resume="none")
    checked = Trainer(tiny_config("train.steps=4", "train.checkpoint_every=0", f"run.output_dir={tmp_path / 'b'}",
                                  "train.val_every=2", "data.val_samples=4", VAL)).fit(resume="none")
    assert checked.losses == plain.losses  # bit-exact
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("val/l1/robot" in r) for r in rows] == [False, True, False, True]


def test_validation_settings_are_checked_at_load(tiny_config):
    with pytest.raises(ConfigError, match=r"data\.val_sources\.0\.name='robt' is not a training source.*'robot'"):
        tiny_config("data.val_sources=[{name: robt, path: synthetic}]", "train.val_every=10")
    with pytest.raises(ConfigError, match="train.val_every is set but data.val_sources is empty"):
        tiny_config("train.val_every=5", "data.val_sources=[]")


def test_validation_preprocesses_images_as_the_exported_policy_does(tiny_config):
    """With augmentation on, training crops at random; the policy (and so validation) takes the centre crop."""
    from PIL import Image

    from vla_scale.data.augment import center_crop, inference_preprocessing
    from vla_scale.data.images import to_pixels
    from vla_scale.train.validation import _read, validation_dirs

    trainer = _trainer(tiny_config, "train.val_every=1", "data.augment=true")
    scale = inference_preprocessing(True)["center_crop_scale"]
    raw = _read(validation_dirs(trainer.cfg)[0], 6)
    for stored, sample in zip(raw, trainer.validator.samples["robot"]):
        want = to_pixels(center_crop(Image.fromarray(np.asarray(decode_camera_image(stored["image"]))), scale), 32)
        assert torch.equal(sample["pixels"], want)
    for stored, sample in zip(_read(validation_dirs(trainer.cfg)[1], 6), trainer.validator.samples["vqa"]):
        assert torch.equal(sample["pixels"], to_pixels(np.asarray(decode_camera_image(stored["image"])), 32))  # VL: as is


def test_the_reliance_check_covers_every_episode_and_swaps_images_across_episodes(tmp_path):
    """Robot data is stored episode by episode: validation reads samples spread over all of it (not the first
    episodes), and each sample's image is swapped with one from another episode (a neighbour is the next step
    of the same episode, whose image is nearly the same: a gap of 0.000 for any policy)."""
    from vla_scale.data.schema import robot_sample
    from vla_scale.data.writer import ShardWriter
    from vla_scale.train.validation import _read, partner

    with ShardWriter(tmp_path / "held_out") as w:
        for e in range(6):
            for t in range(20):
                w.write(robot_sample(image=np.full((8, 8, 3), 10 * e + t, np.uint8), instruction="pick it up",
                                     action=np.full(7, 0.01 * t, np.float32), dataset="d", episode=e, step=t))
    for limit in (6, 12, 50):
        raw = _read(tmp_path / "held_out", limit)
        episodes = [int(s["episode"]) for s in raw]
        assert len(raw) == limit and set(episodes) == set(range(6)), episodes
        assert all(episodes[partner(i, limit)] != episodes[i] for i in range(limit))
    assert len(_read(tmp_path / "held_out", 500)) == 120  # a set smaller than the limit is read whole


def test_the_reliance_check_never_swaps_an_image_for_the_same_scene():
    """Four held-out episodes whose scenes repeat as A, B, A, B (the demo's cube spots 2, 1, 2, 1): half the set
    away is the same scene, so each sample is swapped with an episode of the other scene, still from another
    episode at the same phase."""
    from vla_scale.train.validation import partner, partners

    steps, scenes = 8, [0, 1, 0, 1]
    pixels = torch.stack([torch.full((3, 4, 4), 100 * scenes[e] + t, dtype=torch.uint8)
                          for e in range(4) for t in range(steps)])
    n = pixels.shape[0]
    assert all(scenes[partner(i, n) // steps] == scenes[i // steps] for i in range(n))  # the old choice
    pairs = partners(pixels)
    for i, j in enumerate(pairs):
        assert scenes[j // steps] != scenes[i // steps]
        assert j % steps == i % steps  # same phase of the task
    # All images alike (ties): half the set away, as before.
    same = torch.zeros((6, 3, 2, 2), dtype=torch.uint8)
    assert partners(same) == [partner(i, 6) for i in range(6)]
    assert partners(same[:1]) == [0]
