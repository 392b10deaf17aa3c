"""A torchrun worker for tests/test_deepspeed.py: train with the DeepSpeed strategy, inject faults, report.

    torchrun ... tests/workers/ds_worker.py OUT_DIR CONFIG [KEY=VALUE ...]

Runs `vla-scale train` in-process (`Trainer.fit`, resume from $VLA_SCALE_TEST_RESUME,
default "auto"), then writes what the tests assert on, so that the tests never
trust an exit code alone (DeepSpeed sometimes aborts at process exit, MACHINE.md):
- OUT_DIR/report_rank<r>.json: losses, restart count, ZeRO-3 partitioning of
  every trainable parameter, ZeRO attributes of the frozen encoder, optimizer
  state sizes, Adam step counters, skipped-step counter;
- OUT_DIR/core_state.pt (rank 0): the gathered trainable weights after training;
- OUT_DIR/probe.pt (rank 0): a batch and the trained model's outputs on it.
- OUT_DIR/grads_step1.pt (rank 0, with VLA_SCALE_TEST_GRADS=1): the full gradient of every
  trainable parameter at the first step, before clipping and the update.
A VLAScaleError (e.g. a non-finite loss with on_nonfinite=stop) is written to
OUT_DIR/error_rank<r>.txt and the worker exits with status 2, like the CLI.

Faults, each fired by rank $VLA_SCALE_TEST_FAULT_RANK (default 1) and at most
once per marker file $VLA_SCALE_TEST_FAULT_MARKER (created just before firing,
so a restarted attempt runs clean):
- VLA_SCALE_TEST_CRASH_AT_STEP=k: os._exit(1) at the start of step k;
- VLA_SCALE_TEST_KILL_IN_SAVE_AT_STEP=k: os._exit(1) inside the save of step k,
  after this rank's DeepSpeed files are written and before the save is sealed;
- VLA_SCALE_TEST_NAN_AT_STEP=k: this rank's frozen-encoder features of step k
  are NaN (a non-finite loss on one rank only).

With VLA_SCALE_TEST_STARTUP_MEMORY=1 each report holds `startup_memory`, this
process's resident memory attributable to the model during start-up, in bytes
(/proc/self/status, the peak reset with clear_refs at each window's start):
`build_peak` and `build_held` over `strategy.build_model` (its peak and what
it leaves resident), `setup_peak` over `strategy.setup` until the optimizer is
made (the frozen encoders' move and ZeRO-3's partitioning of the core), and
`peak` = max(build_peak, build_held + setup_peak). The data pipeline built
between the two windows is not counted.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # every gloo collective warns on torch 2.13

import torch  # noqa: E402

from vla_scale.config import load_config  # noqa: E402
from vla_scale.errors import VLAScaleError  # noqa: E402
from vla_scale.train import deepspeed_strategy as dss  # noqa: E402
from vla_scale.train.trainer import Trainer  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
FAULT_RANK = int(os.environ.get("VLA_SCALE_TEST_FAULT_RANK", 1))


def _fault_due(var: str, step: int) -> bool:
    at = os.environ.get(var)
    if at is None or int(at) != step or RANK != FAULT_RANK:
        return False
    marker = os.environ.get("VLA_SCALE_TEST_FAULT_MARKER")
    if marker:
        if os.path.exists(marker):
            return False
        Path(marker).write_text(f"{var}={at} rank {RANK}\n")
    return True


def _install_faults() -> None:
    train_step, save = dss.DeepSpeedStrategy.train_step, dss.DeepSpeedStrategy.save

    def faulty_train_step(self, micro_batches):
        step = self.engine.global_steps + 1
        if _fault_due("VLA_SCALE_TEST_CRASH_AT_STEP", step):
            sys.stderr.write(f"[test fault] rank {RANK} crashes at the start of step {step}\n")
            sys.stderr.flush()
            os._exit(1)
        if _fault_due("VLA_SCALE_TEST_NAN_AT_STEP", step):
            frozen = self.model.frozen
            clean = frozen.forward
            frozen.forward = lambda images: {k: torch.full_like(v, float("nan")) for k, v in clean(images).items()}
            try:
                return train_step(self, micro_batches)
            finally:
                del frozen.forward
        return train_step(self, micro_batches)

    def faulty_save(self, ckpt_dir):
        save(self, ckpt_dir)
        if _fault_due("VLA_SCALE_TEST_KILL_IN_SAVE_AT_STEP", self.engine.global_steps):
            sys.stderr.write(f"[test fault] rank {RANK} dies inside the save of step {self.engine.global_steps}\n")
            sys.stderr.flush()
            os._exit(1)

    dss.DeepSpeedStrategy.train_step = faulty_train_step
    dss.DeepSpeedStrategy.save = faulty_save


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise RuntimeError(f"/proc/self/status has no {field}")


STARTUP_MEMORY: dict[str, int] = {}


def _reset_peak() -> int:
    """Reset VmHWM to the current VmRSS (Linux clear_refs "5"); returns that RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def _install_startup_memory_probe() -> None:
    # Code is not start-up memory: the modules the tiny preset's build and setup import (about
    # 200 MB of RSS for transformers' modeling modules alone) are imported before any baseline.
    import deepspeed  # noqa: F401
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration, SiglipVisionModel  # noqa: F401

    build_model, setup, make_optimizer = dss.DeepSpeedStrategy.build_model, dss.DeepSpeedStrategy.setup, \
        dss.make_optimizer
    marks: dict[str, int] = {}

    def measured_build_model(self, cfg):
        marks["build_base"] = _reset_peak()
        out = build_model(self, cfg)
        STARTUP_MEMORY["build_peak"] = _proc_status_bytes("VmHWM") - marks["build_base"]
        STARTUP_MEMORY["build_held"] = _proc_status_bytes("VmRSS") - marks["build_base"]
        return out

    def measured_setup(self, model):
        marks["setup_base"] = _reset_peak()
        return setup(self, model)

    def measured_make_optimizer(params, cfg):
        STARTUP_MEMORY["setup_peak"] = _proc_status_bytes("VmHWM") - marks["setup_base"]
        STARTUP_MEMORY["peak"] = max(STARTUP_MEMORY["build_peak"],
                                     STARTUP_MEMORY["build_held"] + STARTUP_MEMORY["setup_peak"])
        return make_optimizer(params, cfg)

    dss.DeepSpeedStrategy.build_model = measured_build_model
    dss.DeepSpeedStrategy.setup = measured_setup
    dss.make_optimizer = measured_make_optimizer


def _report(trainer: Trainer, result) -> dict:
    strategy = trainer.strategy
    engine = strategy.engine
    zero_opt = engine.optimizer  # DeepSpeed's ZeRO-3 optimizer around our torch AdamW
    base = zero_opt.optimizer
    in_groups = {id(p) for group in zero_opt.fp16_groups for p in group}
    frozen = dict(strategy.model.frozen.named_parameters())
    return {
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        "losses": {str(k): v for k, v in result.losses.items()},
        "final_step": result.final_step,
        "global_steps": engine.global_steps,
        "nonfinite_steps": strategy.nonfinite_steps,
        "startup_memory": STARTUP_MEMORY,
        "numerics": {"param_dtype": str(engine.module.llm.get_input_embeddings().weight.dtype),
                     "grad_accum_dtype": str(zero_opt.gradient_accumulation_dtype),
                     "grad_buffer_dtype": str(zero_opt.grad_partitions_flat_buffer.dtype),
                     "communication_data_type": str(engine.communication_data_type)},
        "trainable": [{"name": n, "ds_numel": p.ds_numel, "partition_numel": p.ds_tensor.numel(),
                       "persist": bool(getattr(p, "ds_persist", False))}
                      for n, p in engine.module.named_parameters()],
        "frozen": [{"name": n, "zero_attrs": sorted(a for a in ("ds_id", "ds_numel", "ds_tensor") if hasattr(p, a)),
                    "requires_grad": p.requires_grad, "in_optimizer": id(p) in in_groups}
                   for n, p in frozen.items()],
        "optimizer": {
            "exp_avg_numel": sum(s["exp_avg"].numel() for s in base.state.values()),
            "exp_avg_sq_numel": sum(s["exp_avg_sq"].numel() for s in base.state.values()),
            "master_numel": sum(t.numel() for t in zero_opt.fp32_partitioned_groups_flat),
            "adam_steps": [float(s["step"]) for s in base.state.values()],
        },
    }


def _probe(trainer: Trainer, out: Path) -> None:
    """The trained model's outputs on a batch (a collective under ZeRO-3: every rank runs its own batch,
    rank 0 saves its batch with the outputs)."""
    batch = trainer.loader.next_step()[0]
    strategy = trainer.strategy
    strategy.engine.eval()
    with torch.no_grad():
        dev = {k: v.to(strategy.device) for k, v in batch.items()}
        feats = strategy.model.frozen(dev["pixel_values"])
        loss, loss_sum, tokens, correct, _ = strategy.engine(dev["pixel_values"], dev["input_ids"],
                                                          dev["attention_mask"], dev["labels"], feats)
    state = strategy.trainable_state_dict()
    if strategy.is_main:
        torch.save({"batch": batch, "loss": loss.cpu(), "sample_loss_sum": loss_sum.cpu(),
                    "sample_correct": correct.cpu()}, out / "probe.pt")
        torch.save(state, out / "core_state.pt")


def main() -> int:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    _install_faults()
    if os.environ.get("VLA_SCALE_TEST_STARTUP_MEMORY"):
        _install_startup_memory_probe()
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg)
    if os.environ.get("VLA_SCALE_TEST_GRADS"):
        seen: list[int] = []

        def probe(grads: dict) -> None:  # called on every rank (the gather is a collective)
            if not seen and RANK == 0:
                torch.save(grads, out / "grads_step1.pt")
            seen.append(1)

        trainer.strategy.grad_probe = probe
    try:
        result = trainer.fit(resume=os.environ.get("VLA_SCALE_TEST_RESUME", "auto"))
    except VLAScaleError as e:
        (out / f"error_rank{RANK}.txt").write_text(f"{type(e).__name__}: {e}\n")
        return 2
    _probe(trainer, out)
    (out / f"report_rank{trainer.strategy.rank}.json").write_text(json.dumps(_report(trainer, result), indent=1))
    trainer.strategy.close()
    from vla_scale.train.distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
