"""The `vla-scale` command: help for every subcommand and one-line errors (the demo: test_demo.py)."""
import json
import os
import subprocess
import sys

import pytest

from vla_scale.cli import main

from conftest import TINY_PRESET


def _run(*args, timeout=600, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "vla_scale.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.mark.parametrize("command", ["train", "export", "predict", "demo"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_config_typo_is_one_line_and_exit_code_2(tmp_path):
    r = _run("train", str(TINY_PRESET), "train.lrr=1", cwd=tmp_path)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "train.lrr" in lines[0] and "train.lr" in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_checkpoint_for_export_is_one_line(tmp_path):
    r = _run("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nope" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_export_predict_from_the_command_line(tiny_llava, tmp_path):
    run = tmp_path / "run"
    r = _run("train", str(TINY_PRESET), f"model.source={tiny_llava}", f"run.output_dir={run}", "train.steps=3",
             "train.warmup_steps=1", "train.progress=false")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_00000003")
    r = _run("export", str(run), str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    import numpy as np

    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    r = _run("predict", str(tmp_path / "export"), "--image", str(tmp_path / "img.png"),
             "--instruction", "pick up the red block", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["action"]) == 7 and out["forward_passes"] > 0
    r = _run("export", str(run), str(tmp_path / "export"))  # exists: refused, untouched
    assert r.returncode == 2 and "--force" in r.stderr


def _one_line_error(r):
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("source_type", ["auto", "llava", "paligemma", "parts", "parts-encoder"])
def test_missing_source_folder_is_one_line(source_type, tmp_path, request):
    missing = tmp_path / "moved-away"
    if source_type.startswith("parts"):
        preset = TINY_PRESET.parent / "tiny_paired.yaml"
        if source_type == "parts":
            key, overrides = "model.llm", [f"model.llm={missing}"]
        else:  # the LLM is there, an encoder folder is not
            parts = request.getfixturevalue("tiny_parts")
            key, overrides = "model.encoders.1.path", [f"model.llm={parts['llm']}",
                                                      f"model.encoders.0.path={parts['dinov2']}",
                                                      f"model.encoders.1.path={missing}"]
    else:
        preset, key = TINY_PRESET, "model.source"
        overrides = [f"model.source={missing}", f"model.source_type={source_type}"]
    r = _run("train", str(preset), *overrides, f"run.output_dir={tmp_path / 'run'}", "train.steps=1",
             "train.warmup_steps=1", "train.progress=false")
    line = _one_line_error(r)
    assert key in line and str(missing) in line and "does not exist" in line


def test_export_finds_a_moved_source_with_dash_dash_source(tiny_llava, tiny_config, tmp_path):
    """The frozen encoder is read from the source folder at export: when it moved, the error says
    where it looked and what to pass; --source NEWDIR works, and the content hash is still checked."""
    import shutil

    from vla_scale.models.tiny import build_tiny_llava
    from vla_scale.train.trainer import Trainer

    source = tmp_path / "source"
    shutil.copytree(tiny_llava, source)
    Trainer(tiny_config(f"model.source={source}", "train.steps=1", "train.checkpoint_every=1")).fit(resume="none")
    run = tmp_path / "run"
    moved = tmp_path / "elsewhere" / "source"
    moved.parent.mkdir()
    shutil.move(str(source), str(moved))

    line = _one_line_error(_run("export", str(run), str(tmp_path / "export")))
    assert str(source) in line and "--source" in line
    assert not (tmp_path / "export").exists()

    other = build_tiny_llava(tmp_path / "other", seed=1)  # same architecture, other weights
    line = _one_line_error(_run("export", str(run), str(tmp_path / "export"), "--source", str(other)))
    assert "content hash" in line and str(other) in line
    assert not (tmp_path / "export").exists()

    r = _run("export", str(run), str(tmp_path / "export"), "--source", str(moved))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()
