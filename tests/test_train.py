"""The training loop: loss falls, checkpoints resume exactly, bad resumes fail clearly."""
import math

import pytest
import torch

from vla_scale.errors import CheckpointError, ConfigError
from vla_scale.train.metrics import read_metrics
from vla_scale.train.trainer import Trainer


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_config, tmp_path):
    full = Trainer(tiny_config("train.steps=4", "train.checkpoint_every=0",
                               f"run.output_dir={tmp_path / 'a'}")).fit(resume="none")
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", f"run.output_dir={tmp_path / 'b'}")
    first = Trainer(cfg).fit(resume="none", stop_after=2)
    assert first.last_checkpoint.name == "step_00000002" and sorted(first.losses) == [1, 2]
    second = Trainer(cfg).fit(resume="auto")  # a new process would do exactly this
    assert sorted(second.losses) == [3, 4]
    resumed = {**first.losses, **second.losses}
    assert resumed == full.losses  # bit-exact in fp32 on CPU
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_loss_falls_and_metrics_are_logged_per_source(tiny_config, tmp_path):
    # 30 steps check the loop learns at all: at the preset's lr (3e-4, chosen so the demo's 2000 steps
    # end up reading the image) the loss moves too little in 30 steps to tell; 3e-3 moves it.
    cfg = tiny_config("train.steps=30", "train.checkpoint_every=0", "train.lr=3e-3")
    result = Trainer(cfg).fit(resume="none")
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    run = result.run_dir
    assert (run / "config.yaml").is_file()
    rows = read_metrics(run / "metrics.jsonl")
    assert len(rows) == 30
    last = rows[-1]
    for name in ("robot", "vqa", "spatial", "affordance"):
        assert math.isfinite(last[f"loss/{name}"]) and 0 <= last[f"acc/{name}"] <= 1
    assert last["lr"] >= 0 and "perf/samples_per_s" in last
    assert last["data/truncated"] == 0 and last["data/dropped"] == 0  # the preset's samples all fit


def test_resume_with_a_different_model_config_names_the_keys(tiny_config, tmp_path):
    Trainer(tiny_config("train.steps=1")).fit(resume="none")
    changed = tiny_config("train.steps=2", "actions.decimals=2", "model.projector.activation=gelu_tanh")
    with pytest.raises(ConfigError) as e:
        Trainer(changed).fit(resume="auto")
    assert "actions.decimals" in str(e.value) and "model.projector.activation" in str(e.value)


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tiny_config):
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=1", "train.keep_last_k=3")
    Trainer(cfg).fit(resume="none", stop_after=3)
    ckpts = cfg.run.output_dir + "/checkpoints"
    import pathlib

    (pathlib.Path(ckpts) / "step_00000003" / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="step_00000003"):
        result = Trainer(cfg).fit(resume="auto")
    assert sorted(result.losses) == [3, 4]  # resumed from step 2


def test_explicit_missing_checkpoint_is_a_clear_error(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        Trainer(tiny_config("train.steps=1")).fit(resume=str(tmp_path / "nope"))


def test_nonfinite_loss_is_skipped_or_stops(tiny_config, tmp_path):
    from vla_scale.errors import TrainingError

    for mode in ("skip", "stop"):
        cfg = tiny_config("train.steps=2", f"train.on_nonfinite={mode}", f"run.output_dir={tmp_path / mode}")
        trainer = Trainer(cfg)
        trainer._build()
        trainer._build = lambda: None  # keep the sabotaged model below
        with torch.no_grad():
            trainer.model.core.projector.layers[-1].bias.fill_(float("nan"))
        if mode == "skip":
            with pytest.warns(RuntimeWarning, match="skipped"):
                result = trainer.fit(resume="none")
            assert all(math.isnan(v) for v in result.losses.values())
            assert trainer.strategy.nonfinite_steps == 2
        else:
            with pytest.raises(TrainingError, match="non-finite"):
                trainer.fit(resume="none")


def test_activation_checkpointing_gives_the_same_losses(tiny_config, tmp_path):
    plain = Trainer(tiny_config("train.steps=3", f"run.output_dir={tmp_path / 'a'}")).fit(resume="none")
    trainer = Trainer(tiny_config("train.steps=3", "model.gradient_checkpointing=true",
                                  f"run.output_dir={tmp_path / 'b'}"))
    ckpt = trainer.fit(resume="none")
    assert trainer.model.core.llm.is_gradient_checkpointing
    assert all(e.model.is_gradient_checkpointing for e in trainer.model.core.encoders.values())
    for step in (1, 2, 3):
        assert ckpt.losses[step] == pytest.approx(plain.losses[step], abs=1e-5)


def test_resume_allows_moved_weights_and_hardware_switches(tiny_config, tiny_llava, tmp_path):
    import shutil as _sh

    cfg = tiny_config("train.steps=2", "train.checkpoint_every=1")
    Trainer(cfg).fit(resume="none", stop_after=1)
    moved = tmp_path / "moved-source"
    _sh.copytree(tiny_llava, moved)
    again = tiny_config("train.steps=2", "train.checkpoint_every=1", f"model.source={moved}",
                        "model.gradient_checkpointing=true", "model.attn_implementation=eager")
    assert sorted(Trainer(again).fit(resume="auto").losses) == [2]
