"""Configuration: presets load, overrides apply, and mistakes name the key and the nearest valid one."""
import pytest

from vla_scale.config import load_config, save_config
from vla_scale.errors import ConfigError

from conftest import TINY_PRESET


def test_preset_and_overrides_apply():
    cfg = load_config(TINY_PRESET, ["train.lr=3e-4", "model.encoders.1.trainable=false", "train.betas=[0.9,0.95]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.encoders[1].trainable is False
    assert cfg.train.betas == [0.9, 0.95]


@pytest.mark.parametrize("override, key, nearest", [
    ("train.lrr=1", "train.lrr", "train.lr"),
    ("trian.lr=1", "trian", "train"),
    ("model.projector.hiden_dims=[3]", "model.projector.hiden_dims", "model.projector.hidden_dims"),
    ("data.sources.0.wieght=2", "wieght", "weight"),
])
def test_unknown_key_names_key_and_nearest(override, key, nearest):
    with pytest.raises(ConfigError) as e:
        load_config(TINY_PRESET, [override])
    assert key in str(e.value) and nearest in str(e.value)


def test_typo_in_yaml_names_file_and_nearest(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stesp: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.stesp.*train.steps"):
        load_config(bad)


@pytest.mark.parametrize("override, match", [
    ("train.lr=abc", "train.lr"),
    ("train.strategy=deepsped", "deepspeed"),
    ("train.global_batch_size=7", "multiple"),
    ("actions.keep_dims=[9]", "keep_dims"),
    ("train", "key=value"),
])
def test_bad_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY_PRESET, [override])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(TINY_PRESET, ["train.lr=0.5"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_encoder_names_that_shadow_module_attributes_are_rejected():
    with pytest.raises(ConfigError, match="'train'"):
        load_config(TINY_PRESET, ["model.encoders=[{name: train}]"])
