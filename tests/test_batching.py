"""Batch sizes that follow the world size (`train.gradient_accumulation`, `vla_scale.train.batching`).

What a user relies on: with accumulation `auto` a config runs on every world size that divides its
global batch, with global = micro x accumulation x world exactly; one that cannot divide is a
ConfigError before anything starts, and every setting the error proposes does divide; the cluster
presets keep the paper's global batch and divide on 8 and on 64 GPUs; the planner, the DeepSpeed
config and the data loader all derive the same accumulation (or say the same error).
"""
import itertools
import json
import math
import re

import pytest
import torch

from vla_scale.cli import main
from vla_scale.config import TrainConfig, load_config
from vla_scale.errors import ConfigError
from vla_scale.train.batching import micro_batch_sizes, nearest_global_batch_sizes, resolve_accumulation

from conftest import REPO, TINY_PRESET

OPENVLA = REPO / "configs" / "openvla_plus_7b.yaml"
PI0 = REPO / "configs" / "pi0_plus_3b.yaml"


def _train(global_batch: int, micro: int, accumulation: int | str = "auto") -> TrainConfig:
    return TrainConfig(global_batch_size=global_batch, micro_batch_size=micro, gradient_accumulation=accumulation)


def _divides(global_batch: int, micro: int, world: int) -> bool:
    try:
        resolve_accumulation(_train(global_batch, micro), world)
        return True
    except ConfigError:
        return False


def test_auto_accumulation_is_exact_wherever_the_world_divides_and_an_error_elsewhere():
    """Every (global, micro, world) in a small space: the answer multiplies back to the global batch,
    and an error comes exactly when the global batch is not a multiple of micro x world."""
    for g, m, w in itertools.product(range(1, 49), range(1, 17), range(1, 17)):
        if g % (m * w) == 0:
            a = resolve_accumulation(_train(g, m), w)
            assert m * a * w == g
        else:
            with pytest.raises(ConfigError, match=rf"train.global_batch_size={g} .*{w} rank"):
                resolve_accumulation(_train(g, m), w)


def test_an_explicit_accumulation_must_agree_with_the_world():
    assert resolve_accumulation(_train(256, 4, 8), 8) == 8
    assert resolve_accumulation(_train(256, 4, 1), 64) == 1
    with pytest.raises(ConfigError, match=r"train.gradient_accumulation=8 .* 64 rank\(s\) makes a global batch "
                                          r"of 4 x 8 x 64 = 2048, but train.global_batch_size=256") as e:
        resolve_accumulation(_train(256, 4, 8), 64)
    assert "train.gradient_accumulation=auto (gives 1)" in str(e.value)
    assert "train.global_batch_size=2048 (keeps accumulation 8)" in str(e.value)


@pytest.mark.parametrize("g,m,w", [(256, 32, 64), (256, 32, 48), (256, 32, 3), (192, 24, 64), (100, 7, 6),
                                   (1000, 16, 24), (96, 5, 4)])
def test_every_setting_the_error_proposes_divides_and_none_nearer_was_left_out(g, m, w):
    with pytest.raises(ConfigError) as e:
        resolve_accumulation(_train(g, m), w)
    message = str(e.value)
    assert "\n" not in message  # the CLI prints it as one line
    globals_ = nearest_global_batch_sizes(g, m, w)
    assert globals_ and all(_divides(x, m, w) for x in globals_)
    # Nearest: nothing between the one below (if any) and the one above divides with this micro-batch.
    lo, hi = (globals_[0] if len(globals_) == 2 else 0), globals_[-1]
    assert lo < g < hi and not any(_divides(x, m, w) for x in range(lo + 1, hi))
    for x in globals_:
        assert f"{x} (accumulation {x // (m * w)})" in message
    micros = micro_batch_sizes(g, w, near=m)
    assert all(_divides(g, d, w) for d in micros)
    valid = [d for d in range(1, g + 1) if _divides(g, d, w)]
    if valid:
        far = max(abs(math.log(d / m)) for d in micros)
        assert all(abs(math.log(d / m)) >= far for d in valid if d not in micros)
        assert f"train.micro_batch_size={micros[0]} (accumulation" in message
    else:
        assert micros == [] and "no micro-batch size works" in message


def test_explicit_accumulation_errors_propose_only_settings_that_divide():
    for g, m, a, w in itertools.product((64, 96, 256), (2, 4, 32), (1, 2, 8), (1, 3, 8, 64)):
        if g % (m * a):  # caught at load (below); resolve_accumulation sees only well-formed configs
            continue
        if m * a * w == g:
            assert resolve_accumulation(_train(g, m, a), w) == a
            continue
        with pytest.raises(ConfigError) as e:
            resolve_accumulation(_train(g, m, a), w)
        for key, value in re.findall(r"train\.(\w+)=(\w+)", str(e.value).split("Nearest valid settings")[1]):
            fixed = {"global_batch_size": g, "micro_batch_size": m, "gradient_accumulation": a}
            fixed[key] = value if value == "auto" else int(value)
            cfg = _train(fixed["global_batch_size"], fixed["micro_batch_size"], fixed["gradient_accumulation"])
            resolve_accumulation(cfg, w)  # does not raise


def test_the_key_is_validated_at_load():
    assert load_config(TINY_PRESET).train.gradient_accumulation == "auto"
    assert load_config(TINY_PRESET, ["train.micro_batch_size=4", "train.gradient_accumulation=2"]) \
        .train.gradient_accumulation == 2
    for bad, words in (("0", "positive integer"), ("-1", "positive integer"), ("often", "positive integer"),
                       ("2.5", "gradient_accumulation"), ("3", "not a multiple of")):
        with pytest.raises(ConfigError, match=words):
            load_config(TINY_PRESET, [f"train.gradient_accumulation={bad}"])


@pytest.mark.parametrize("preset,paper_global", [(OPENVLA, 256), (PI0, 192)], ids=["openvla_plus_7b", "pi0_plus_3b"])
def test_cluster_presets_keep_the_papers_global_batch_and_divide_on_8_and_64_gpus(preset, paper_global):
    t = load_config(preset).train
    assert t.global_batch_size == paper_global and t.gradient_accumulation == "auto"
    assert resolve_accumulation(t, 8) == 8 and resolve_accumulation(t, 64) == 1


def test_plan_reports_the_accumulation_or_the_error_for_the_planned_world(capsys):
    assert main(["plan", str(OPENVLA), "--gpus", "8", "--nodes", "8"]) == 0
    assert "batch: global 256 = micro-batch 4 x accumulation 1 x world 64" in capsys.readouterr().out
    assert main(["plan", str(OPENVLA), "train.micro_batch_size=32", "--gpus", "8", "--nodes", "8", "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)  # the memory plan is still printed
    assert data["grad_accumulation"] is None and "train.micro_batch_size=4 (accumulation 1)" in data["batch_error"]
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "vla-scale plan: error: train.global_batch_size=256 is not divisible" in err[0]


def test_deepspeed_config_and_data_loader_use_the_same_rule(tmp_path):
    from vla_scale.data.pipeline import CoTrainingLoader
    from vla_scale.train.deepspeed_strategy import build_deepspeed_config

    cfg = load_config(TINY_PRESET, [f"run.output_dir={tmp_path}", "train.global_batch_size=16",
                                    "train.micro_batch_size=2"])
    ds = build_deepspeed_config(cfg, world_size=4, device=torch.device("cpu"))
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 16
    with pytest.raises(ConfigError) as expected:
        resolve_accumulation(cfg.train, 3)
    with pytest.raises(ConfigError) as from_deepspeed:
        build_deepspeed_config(cfg, world_size=3, device=torch.device("cpu"))
    with pytest.raises(ConfigError) as from_loader:  # checked before the loader touches any data
        CoTrainingLoader(cfg, None, {}, [], rank=0, world_size=3)  # type: ignore[arg-type]
    assert str(from_deepspeed.value) == str(from_loader.value) == str(expected.value)
