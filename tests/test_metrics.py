"""LR schedule, throughput/MFU arithmetic, per-source metrics and the metrics log."""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from vla_scale.errors import ConfigError
from vla_scale.train import metrics as metrics_module
from vla_scale.train.metrics import (
    MetricsLogger,
    PerSourceAccumulator,
    ThroughputMeter,
    read_metrics,
    transformer_flops_per_token,
)
from vla_scale.train.schedule import build_scheduler, lr_lambda

# ---------------------------------------------------------------------------- schedule


def test_warmup_is_linear_and_starts_above_zero() -> None:
    values = [lr_lambda(s, warmup_steps=4, total_steps=20) for s in range(4)]
    assert values == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_lambda(0, warmup_steps=0, total_steps=20) == 1.0


def test_cosine_decays_monotonically_to_min_ratio() -> None:
    kw = dict(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    after = [lr_lambda(s, **kw) for s in range(3, 21)]
    assert after[0] == 1.0
    assert all(a > b for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(0.1)
    assert lr_lambda(50, **kw) == pytest.approx(0.1)  # past the end: stays at the floor
    # halfway through the decay (peak at step 3, end at 20): halfway between 1 and 0.1
    assert lr_lambda(3 + 17 / 2, **kw) == pytest.approx(0.55)


def test_constant_schedule_and_bad_values() -> None:
    assert [lr_lambda(s, warmup_steps=2, total_steps=10, schedule="constant") for s in (0, 1, 2, 9, 10)] == [
        0.5,
        1.0,
        1.0,
        1.0,
        1.0,
    ]
    with pytest.raises(ConfigError, match="linear"):
        lr_lambda(0, warmup_steps=0, total_steps=10, schedule="linear")
    with pytest.raises(ConfigError, match="warmup_steps"):
        lr_lambda(0, warmup_steps=11, total_steps=10)


def test_scheduler_state_dict_round_trip_gives_identical_lrs() -> None:
    kw = dict(warmup_steps=3, total_steps=30, min_lr_ratio=0.05)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=1e-3)
    sched = build_scheduler(opt, **kw)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)  # the first step trains
    for _ in range(7):
        opt.step()
        sched.step()
    saved = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))
    pickle.dumps(sched.lr_lambdas[0])  # a partial of a module function, not a lambda

    param2 = torch.nn.Parameter(torch.zeros(2))
    opt2 = torch.optim.AdamW([param2], lr=1e-3)
    sched2 = build_scheduler(opt2, **kw)
    opt2.load_state_dict(saved[0])
    sched2.load_state_dict(saved[1])
    for _ in range(25):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        opt.step(), sched.step(), opt2.step(), sched2.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.05)


# ---------------------------------------------------------------------------- throughput


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_excludes_warmup_and_computes_mfu() -> None:
    clock = FakeClock()
    meter = ThroughputMeter(warmup_steps=1, peak_flops_per_device=2e12, num_devices=2, clock=clock)
    meter.start()
    assert meter.summary() == {}
    clock.now = 10.0  # first step: compilation, excluded
    meter.step(samples=8, tokens=1000, flops=99e12)
    for t in (12.0, 14.0):
        clock.now = t
        meter.step(samples=8, tokens=1000, flops=4e12)
    s = meter.summary()
    assert s["step_time_s"] == pytest.approx(2.0)
    assert s["samples_per_s"] == pytest.approx(4.0)
    assert s["tokens_per_s"] == pytest.approx(500.0)
    assert s["tokens_per_s_per_device"] == pytest.approx(250.0)
    # 8e12 FLOPs in 4 s on 2 devices = 1e12 FLOP/s per device, peak 2e12
    assert s["mfu"] == pytest.approx(0.5)

    meter.reset()  # a new window: no warm-up step excluded again
    clock.now = 15.0
    meter.step(samples=4, tokens=100)  # no flops: MFU unknown for this window
    s = meter.summary()
    assert s["step_time_s"] == pytest.approx(1.0) and s["samples_per_s"] == pytest.approx(4.0)
    assert "mfu" not in s


def test_throughput_requires_start() -> None:
    with pytest.raises(RuntimeError, match="start"):
        ThroughputMeter().step(1, 1)


def test_transformer_flops_per_token() -> None:
    assert transformer_flops_per_token(n_params=100, n_layers=2, hidden=8, seq_len=16) == 6 * 100 + 12 * 2 * 8 * 16


# ---------------------------------------------------------------------------- per source


def test_per_source_accumulator_matches_hand_computation() -> None:
    acc = PerSourceAccumulator(["robot", "vqa", "spatial"])
    loss1 = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    acc.add(loss1, torch.tensor([4, 6, 8]), torch.tensor([1, 3, 8]), torch.tensor([0, 1, 0]))
    acc.add(torch.tensor([1.0]), torch.tensor([2]), torch.tensor([2]), torch.tensor([1]))
    out = acc.compute()
    assert set(out) == {"loss/robot", "acc/robot", "tokens/robot", "loss/vqa", "acc/vqa", "tokens/vqa"}
    assert out["loss/robot"] == pytest.approx((2 + 4) / (4 + 8))
    assert out["acc/robot"] == pytest.approx((1 + 8) / (4 + 8))
    assert out["tokens/robot"] == 12
    assert out["loss/vqa"] == pytest.approx((3 + 1) / (6 + 2))
    assert out["acc/vqa"] == pytest.approx((3 + 2) / (6 + 2))

    # A cross-rank sum (here: two identical ranks) keeps the means.
    reduced = acc.compute(reduce=lambda t: t.mul_(2))
    assert reduced["tokens/robot"] == 24 and reduced["loss/robot"] == pytest.approx(out["loss/robot"])

    acc.reset()
    assert acc.compute() == {}
    with pytest.raises(ValueError, match="out of range"):
        acc.add(torch.ones(1), torch.ones(1), torch.ones(1), torch.tensor([3]))


# ---------------------------------------------------------------------------- log file


def _strict_lines(path: Path) -> list[dict]:
    def refuse(name: str):
        raise AssertionError(f"invalid JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_logger_writes_valid_json_lines_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=True) as log:
        log.log(1, {"loss": 2.5, "lr": 1e-4})
        log.log(2, {"loss": float("nan"), "grad_norm": float("inf"), "tokens": torch.tensor(7)})
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2]
    assert lines[0]["loss"] == 2.5 and isinstance(lines[0]["time"], float)
    assert lines[1]["loss"] is None and lines[1]["grad_norm"] is None and lines[1]["tokens"] == 7
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert read_metrics(tmp_path) == lines


def test_only_rank_zero_writes(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run", rank=1) as log:
        log.log(1, {"loss": 1.0})
        log.truncate_after(0)
    assert not (tmp_path / "run").exists()


def test_truncate_after_keeps_one_line_per_step(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 6):
            log.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a crash

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        with pytest.warns(UserWarning, match="not valid JSON"):
            log.truncate_after(3)  # resumed from the step-3 checkpoint
        for step in range(4, 6):
            log.log(step, {"loss": 10.0 * step})
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert [line["loss"] for line in lines] == [1.0, 2.0, 3.0, 40.0, 50.0]

    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.truncate_after(-1)  # a fresh start in a used run directory
    assert read_metrics(tmp_path) == []


def test_torn_last_line_is_not_glued_to_the_next_record(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log(2, {"loss": 1.0})
    with pytest.warns(UserWarning, match=":2: skipping"):
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_missing_tensorboard_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    monkeypatch.setattr(metrics_module, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="TensorBoard") as record:
        with MetricsLogger(tmp_path / "a") as a, MetricsLogger(tmp_path / "b") as b:
            a.log(1, {"x": 1.0})
            b.log(1, {"x": 1.0})
    assert len([w for w in record if "TensorBoard" in str(w.message)]) == 1
    assert read_metrics(tmp_path / "a")[0]["x"] == 1.0
