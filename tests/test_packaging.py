"""Installable on a cluster node: the presets ship inside the package and are found by name.

What a user relies on: `vla-scale train|plan NAME` finds a shipped preset (`openvla_plus_7b`) as
well as a path, and reads the same config either way; a file that exists always wins over a
preset's name; a mistyped name is one error naming the presets. And a built wheel, installed
into a fresh virtual environment with no checkout in sight, carries every preset and
architecture JSON, plans a preset by name from its installed files, and runs the demo from its
installed defaults.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from vla_scale.cli import main
from vla_scale.config import config_to_dict, load_config
from vla_scale.config.presets import arch_dir, preset_dir, preset_names, resolve_config
from vla_scale.errors import ConfigError
from vla_scale.train.plan import resolve_arch

from conftest import REPO

CONFIGS = REPO / "configs"
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in [*CONFIGS.glob("*.yaml"), *CONFIGS.glob("arch/*")])
# What a wheel is built from (an sdist's content); copied so the build leaves the checkout untouched.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "vla_scale", "kernels", "launch", "configs")


@pytest.mark.parametrize("name", [p.stem for p in sorted(CONFIGS.glob("*.yaml"))])
def test_a_preset_name_reads_the_same_config_as_its_path(name):
    assert preset_names() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    by_path = config_to_dict(load_config(CONFIGS / f"{name}.yaml"))
    assert config_to_dict(load_config(name)) == by_path
    assert config_to_dict(load_config(f"{name}.yaml")) == by_path


def test_an_existing_file_wins_over_a_preset_and_a_typo_names_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("tiny.yaml").write_text("train:\n  lr: 0.125\n")
    assert load_config("tiny.yaml").train.lr == 0.125  # the user's file, not the shipped preset
    assert load_config("tiny").train.lr == load_config(CONFIGS / "tiny.yaml").train.lr
    with pytest.raises(ConfigError, match=r"'openvla_plus_7': no such file, and not a shipped preset \(.*tiny.*\); "
                                          r"did you mean 'openvla_plus_7b'\?"):
        load_config("openvla_plus_7")
    with pytest.raises(ConfigError, match="config file not found: configs/nowhere.yaml"):
        resolve_config("configs/nowhere.yaml")  # meant as a path: not guessed as a preset


def test_bare_arch_names_resolve_in_the_installed_arch_folder():
    assert arch_dir() == preset_dir() / "arch"
    assert resolve_arch("llama2_7b", "model.llm_arch") == arch_dir() / "llama2_7b.json"


def test_plan_takes_a_preset_name(capsys):
    assert main(["plan", "pi0_plus_3b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert f"vla-scale plan: {preset_dir() / 'pi0_plus_3b.yaml'}" in out
    assert "batch: global 192 = micro-batch 3 x accumulation 8 x world 8" in out


def _run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_plans_a_preset_by_name_and_runs_the_demo(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", src], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("vla_scale-*.whl")
    with zipfile.ZipFile(wheel) as z:
        packaged = sorted(n[len("vla_scale/configs/"):] for n in z.namelist() if n.startswith("vla_scale/configs/"))
    assert [n for n in packaged if n != "__init__.py"] == SHIPPED  # every preset and arch file, nothing else

    # A fresh venv that sees this venv's dependencies (torch, transformers, ...) through a .pth
    # path entry. .pth files inside that folder are not processed from there, so the checkout's
    # editable install (a .pth import hook) cannot leak in: only the wheel provides vla_scale.
    fresh = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", fresh], tmp_path, env)
    python = fresh / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                     env).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([*pip, "--python", python, "install", "-q", "--no-deps", wheel], tmp_path, env)

    node = tmp_path / "node"  # a working folder outside the checkout
    (node / "tmp").mkdir(parents=True)
    env = {**env, "TMPDIR": str(node / "tmp"), "PYTHONWARNINGS": "ignore"}
    where = _run([python, "-c", "import vla_scale; print(vla_scale.__file__)"], node, env).stdout.strip()
    assert Path(where).is_relative_to(site), where

    cli = fresh / "bin" / "vla-scale"
    out = _run([cli, "plan", "openvla_plus_7b", "--gpus", "8", "--nodes", "8"], node, env).stdout
    installed = site / "vla_scale" / "configs"
    assert f"vla-scale plan: {installed / 'openvla_plus_7b.yaml'}" in out
    assert str(installed / "arch" / "llama2_7b.json") in out  # the preset's bare arch names, from the wheel
    assert "batch: global 256 = micro-batch 4 x accumulation 1 x world 64" in out

    # The demo's shortest run (smoke budget; it stops half-way and resumes, so 2 steps), from its installed
    # defaults: simulator data, the source VLM's stage, co-training, evaluation.
    out = _run([cli, "demo", "--budget", "smoke", "--workdir", node / "demo", "--steps", "2"], node, env).stdout
    assert "[demo] exported the inference folder" in out
    export = node / "demo" / "export"
    assert (export / "model.safetensors").is_file() and (export / "vla_config.json").is_file()
    assert sorted(p.name for p in (node / "demo" / "run" / "checkpoints").glob("step_*")) == \
        ["step_00000001", "step_00000002"]
