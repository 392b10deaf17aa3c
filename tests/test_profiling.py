"""Throughput profiling: the trainer's logged rates, the MFU formula, and `vla-scale profile`.

- The logged tokens/s and samples/s are exactly the tokens and samples of the
  batches the loader gave (counted here, from the micro-batches, and checked
  against what the LLM itself was fed) over the logged wall-time window.
- `ModelFlops` counts what the module docstring of `vla_scale.train.metrics`
  says, recomputed here from the model's named parameters and configs; the LM
  head only at answer positions.
- `vla-scale profile` writes a summary, a Chrome trace with the forward and
  backward in it, and a chart; also as a 2-rank DeepSpeed job under torchrun
  (rank 0 writes the summary, every rank its trace; its tokens/s counts
  both ranks' tokens, checked against one process drawing the same batches).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_PRESET
from vla_scale.cli import main as cli_main
from vla_scale.errors import ConfigError
from vla_scale.models.vla import count_answer_tokens
from vla_scale.train.distributed import free_port
from vla_scale.train.metrics import ModelFlops, ThroughputMeter, peak_flops_per_device, read_metrics
from vla_scale.train.trainer import Trainer

EXIT_ABORT = "terminate called without an active exception"  # rare DeepSpeed abort at exit (MACHINE.md)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class CountingTrainer(Trainer):
    """The real trainer; its loader and the LLM are watched, nothing is replaced."""

    def _build(self) -> None:
        super()._build()
        self.batch_tokens: list[int] = []  # per step: text tokens (not padding) + image tokens, from the batches
        self.batch_samples: list[int] = []
        self.llm_tokens: list[int] = []  # per forward: real positions in the mask the LLM decoder received
        next_step = self.loader.next_step
        image_tokens = self.model.num_image_tokens

        def counted_next_step():
            mbs = next_step()
            self.batch_tokens.append(sum(int(mb["attention_mask"].sum()) + mb["input_ids"].shape[0] * image_tokens
                                         for mb in mbs))
            self.batch_samples.append(sum(mb["input_ids"].shape[0] for mb in mbs))
            return mbs

        self.loader.next_step = counted_next_step
        self.model.core.decoder().register_forward_pre_hook(
            lambda module, args, kwargs: self.llm_tokens.append(_real_positions(kwargs["attention_mask"])),
            with_kwargs=True)


def _real_positions(mask) -> int:
    """Real (not padding) positions in the mask an LLM received: a 2-D padding mask's ones; a 4-D mask
    (`padded_causal_mask`, boolean, or a prefix-LM's additive one) lets a real position see itself."""
    if mask.dim() == 2:
        return int(mask.sum())
    diag = mask.diagonal(dim1=-2, dim2=-1)
    return int(diag.sum() if diag.dtype == torch.bool else (diag == 0).sum())


def test_logged_tokens_per_s_is_the_batches_tokens_over_the_logged_wall_time(tiny_config):
    steps, every = 7, 3
    cfg = tiny_config(f"train.steps={steps}", f"train.log_every={every}", "train.checkpoint_every=3",
                      "train.global_batch_size=8", "train.micro_batch_size=4", "train.peak_flops=1e12")
    trainer = CountingTrainer(cfg)
    trainer.fit(resume="none")
    # What the LLM ran on is what the batches held: 2 micro-batches (forwards) per step.
    per_forward = trainer.llm_tokens
    assert len(per_forward) == 2 * steps
    assert [per_forward[2 * i] + per_forward[2 * i + 1] for i in range(steps)] == trainer.batch_tokens

    rows = {r["step"]: r for r in read_metrics(cfg.run.output_dir)}
    assert sorted(rows) == [3, 6, 7]
    # Windows: step 1 is warm-up; then each line covers the steps since the previous line.
    windows = {3: [2, 3], 6: [4, 5, 6], 7: [7]}
    for step, window in windows.items():
        perf = {k.removeprefix("perf/"): v for k, v in rows[step].items() if k.startswith("perf/")}
        assert perf["window_steps"] == len(window)
        tokens = sum(trainer.batch_tokens[s - 1] for s in window)
        samples = sum(trainer.batch_samples[s - 1] for s in window)
        assert perf["tokens_per_s"] == pytest.approx(tokens / perf["window_s"], rel=1e-12)
        assert perf["tokens_per_s_per_device"] == pytest.approx(tokens / perf["window_s"], rel=1e-12)  # 1 device
        assert perf["samples_per_s"] == pytest.approx(samples / perf["window_s"], rel=1e-12)
        assert perf["step_time_s"] == pytest.approx(perf["window_s"] / len(window), rel=1e-12)
        assert 0 < perf["mfu"] < 1
        # The breakdown: every phase measured, and the additive ones make up the step time.
        parts = [perf[f"time/{p}_s"] for p in ("data", "forward", "backward", "optimizer", "checkpoint", "other")]
        assert all(p >= 0 for p in parts) and perf["time/forward_s"] > 0 and perf["time/backward_s"] > 0
        assert sum(parts) == pytest.approx(perf["step_time_s"], rel=1e-9)
        assert perf["peak_rss_gib"] > 0.1  # CPU: resident memory of a process holding torch and a model
    # The save at step 3 is timed in the interval of step 4 (window of line 6), the one at 6 in step 7's.
    assert rows[3]["perf/time/checkpoint_s"] == 0.0
    assert rows[6]["perf/time/checkpoint_s"] > 0 and rows[7]["perf/time/checkpoint_s"] > 0


def test_meter_breakdown_averages_phases_and_keeps_overlapping_comm_out_of_the_rest():
    now = [0.0]
    meter = ThroughputMeter(warmup_steps=1, clock=lambda: now[0])
    meter.start()
    now[0] = 5.0
    meter.step(4, 100, phases={"forward": 4.0})  # warm-up: left out
    for t in (7.0, 10.0):  # steps of 2 s and 3 s
        now[0] = t
        meter.step(4, 100, phases={"data": 0.5, "forward": 1.0, "backward": 0.5, "comm": 0.75})
    s = meter.summary()
    assert s["window_s"] == 5.0 and s["window_steps"] == 2.0 and s["tokens_per_s"] == 200 / 5.0
    assert s["time/forward_s"] == 1.0 and s["time/comm_s"] == 0.75
    assert s["time/other_s"] == pytest.approx((5.0 - 2 * 2.0) / 2)  # comm overlaps: not subtracted


def test_peak_flops_come_from_the_config_or_the_gpu_table(monkeypatch):
    assert peak_flops_per_device("cpu") is None
    assert peak_flops_per_device("cpu", configured=2e11) == 2e11
    # No GPU here: only the device name is faked, to check the table's order of matching.
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12),
                       ("NVIDIA GeForce RTX 4090", 165e12), ("Some Future GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops_per_device(torch.device("cuda", 0)) == peak, name


def _hand_flops(model, mb) -> float:
    """The documented formula, recomputed from named parameters (not the module's own bookkeeping)."""
    core, p = model.core, model.num_image_tokens
    lengths = mb["attention_mask"].sum(1).double() + p
    answers = int(count_answer_tokens(mb["labels"]))
    b = mb["input_ids"].shape[0]

    def tower(enc, passes: float) -> float:
        c = enc.model.config
        t = p + enc.spec.num_prefix_tokens
        n = sum(x.numel() for x in enc.parameters())
        return passes * (2 * n * t + 4 * c.num_hidden_layers * c.hidden_size * t * t)

    per_image = sum(tower(e, 3.0) for e in core.encoders.values()) + sum(tower(e, 1.0)
                                                                          for e in model.frozen.encoders.values())
    per_image += 6 * sum(x.numel() for x in core.projector.parameters()) * p
    named = dict(core.llm.named_parameters())
    head = [n for n in named if n.startswith("lm_head")]
    tables = {n for n in named if "embed_tokens" in n} | set(head)
    blocks = sum(v.numel() for n, v in named.items() if n not in tables)
    head_n = sum(named[n].numel() for n in head) if head else named["model.embed_tokens.weight"].numel()
    c = core.llm.config
    return (b * per_image + 6 * blocks * float(lengths.sum())
            + 12 * c.num_hidden_layers * c.hidden_size * float((lengths ** 2).sum()) + 6 * head_n * answers)


def test_model_flops_follow_the_documented_formula_and_count_the_head_only_at_answers(tiny_config):
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.models.loading import build_vla

    cfg = tiny_config("train.global_batch_size=8", "train.micro_batch_size=8")
    model, tok = build_vla(cfg.model)
    loader, _ = build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))
    (mb,) = loader.next_step()
    flops = ModelFlops(model)
    assert flops.step_flops([mb]) == pytest.approx(_hand_flops(model, mb), rel=1e-12)
    # One more answer token costs the head's 6 x parameters more than one more prompt token would
    # not: the LM head runs only where the loss is taken.
    as_prompt = dict(mb, labels=torch.full_like(mb["labels"], -100))
    head = model.core.llm.get_output_embeddings().weight.numel()
    answers = int(count_answer_tokens(mb["labels"]))
    assert flops.step_flops([mb]) - flops.step_flops([as_prompt]) == pytest.approx(6 * head * answers, rel=1e-12)


def test_profile_writes_a_summary_a_chrome_trace_and_a_chart(tiny_llava, tmp_path, capsys):
    out = tmp_path / "profile"
    rc = cli_main(["profile", str(TINY_PRESET), f"model.source={tiny_llava}", f"run.output_dir={tmp_path / 'run'}",
                   "train.tensorboard=false", "train.global_batch_size=8", "train.micro_batch_size=4",
                   "--steps", "5", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tokens/s per device" in printed and "backward s" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "summary.txt").read_text().strip() in printed
    # The summary is the run's own log: all measured tokens over all measured wall time.
    rows = [r for r in read_metrics(out / "run") if "perf/window_s" in r]
    assert [r["step"] for r in rows] == [2, 3, 4, 5] and summary["measured_steps"] == 4
    wall = sum(r["perf/window_s"] for r in rows)
    assert summary["wall_s"] == pytest.approx(wall, rel=1e-12)
    assert summary["tokens_per_s"] == pytest.approx(
        sum(r["perf/tokens_per_s"] * r["perf/window_s"] for r in rows) / wall, rel=1e-12)
    assert summary["mfu"] is None  # CPU without train.peak_flops: no peak to divide by
    assert set(summary["breakdown_s"]) >= {"data", "forward", "backward", "optimizer", "other"}
    assert summary["peak_memory_gib"]["rss"] > 0
    trace = json.loads((out / "trace_rank0.json").read_text())  # opens as JSON
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert {"vla_scale/forward", "vla_scale/backward", "vla_scale/optimizer"} <= names
    assert any(n.endswith("Backward0") for n in names)  # autograd's own backward ops were recorded
    steps = {n for n in names if n.startswith("ProfilerStep#")}
    assert len(steps) == 2  # the schedule's active steps only (wait 1, warmup 1, active 2)
    png = (out / "breakdown.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    from PIL import Image

    assert Image.open(out / "breakdown.png").size[0] >= 400


def test_profile_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["profile", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--steps" in text and "Chrome trace" in text and "train.peak_flops" in text


def test_profile_rejects_too_few_steps(tiny_llava, tmp_path, capsys):
    rc = cli_main(["profile", str(TINY_PRESET), f"model.source={tiny_llava}", f"run.output_dir={tmp_path}",
                   "--steps", "2"])
    assert rc == 2
    assert "--steps 2 is too few" in capsys.readouterr().err


def test_bad_peak_flops_and_log_every_are_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="train.peak_flops"):
        tiny_config("train.peak_flops=-1")
    with pytest.raises(ConfigError, match="train.log_every"):
        tiny_config("train.log_every=0")


def test_two_rank_deepspeed_profile_under_torchrun(tiny_llava, tmp_path):
    out = tmp_path / "profile"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLA_SCALE_DIST_TIMEOUT_S="120",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions")))
    batch = ["train.tensorboard=false", "train.global_batch_size=8", "train.micro_batch_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "vla_scale.cli", "profile", str(TINY_PRESET),
           f"model.source={tiny_llava}", f"run.output_dir={tmp_path / 'run'}", "train.strategy=deepspeed", *batch,
           "deepspeed.stage3_param_persistence_threshold=1000", "train.peak_flops=1e12", "--steps", "4",
           "--out", str(out)]
    written = lambda: (out / "summary.json").is_file() and (out / "breakdown.png").is_file()  # noqa: E731
    for attempt in (1, 2):  # one retry, only for DeepSpeed's known abort at exit
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, cwd=REPO)
        try:
            _, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            pytest.fail(f"the 2-rank profile timed out:\n{err[-3000:]}")
        if written() or attempt == 2 or EXIT_ABORT not in err:
            break
        shutil.rmtree(out, ignore_errors=True)
    assert written(), f"the 2-rank profile wrote no summary (exit {proc.returncode}):\n{err[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["devices"] == 2 and summary["strategy"] == "deepspeed"
    assert summary["tokens_per_s_per_device"] == pytest.approx(summary["tokens_per_s"] / 2, rel=1e-12)
    # tokens/s counts both ranks' tokens: the global batches do not depend on the world size, so one
    # process drawing the same steps counts them (steps 2-4; step 1 is warm-up).
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.config import load_config
    from vla_scale.data.pipeline import build_data
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import build_vla

    cfg = load_config(TINY_PRESET, [f"model.source={tiny_llava}", f"run.output_dir={tmp_path / 'count'}", *batch])
    model, tok = build_vla(cfg.model)
    loader, _ = build_data(cfg, PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length))
    per_step = [sum(int(mb["attention_mask"].sum()) + mb["input_ids"].shape[0] * model.num_image_tokens
                    for mb in loader.next_step()) for _ in range(4)]
    assert summary["tokens_per_s"] * summary["wall_s"] == pytest.approx(sum(per_step[1:]), rel=1e-9)
    assert 0 < summary["mfu"] < 1
    # Communication is measured: our all-reduces and ZeRO-3's gathers and reduce-scatters, all on the
    # step's own thread, so inside the step's wall time.
    assert 0 < summary["breakdown_s"]["comm"] < summary["step_time_s"]
    for rank in (0, 1):
        trace = json.loads((out / f"trace_rank{rank}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert {"vla_scale/forward", "vla_scale/backward", "vla_scale/comm"} <= names, rank
    assert summary["traces"] == ["trace_rank0.json", "trace_rank1.json"]
    # One summary, written by rank 0: the log holds one line per step.
    assert [r["step"] for r in read_metrics(out / "run")] == [1, 2, 3, 4]
