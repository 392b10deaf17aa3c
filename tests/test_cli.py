"""The `vla-scale` command: help for every subcommand, one-line errors, and the demo end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    r = _run("demo", "--workdir", str(tmp_path / "demo"), "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert "resuming from the latest checkpoint" in r.stdout
    export = tmp_path / "demo" / "export"
    assert (export / "model.safetensors").is_file() and (export / "vla_config.json").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "demo" / "run" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]
