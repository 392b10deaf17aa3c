"""ZeRO-3 start-up on 2 CPU ranks: the model is built once (rank 0), not once per rank.

Two runs of the same 2-step training on a wider tiny LLaVA (Llama 1024 wide,
4 layers: about 50M trainable parameters, ~190 MB in fp32, large enough to
stand out of the few tens of MB a process allocates anyway):

    every_rank   deepspeed.build_on_every_rank=true: every rank builds the whole model on the
                 host, then ZeRO-3 partitions it (the behaviour before rank-0 building)
    rank0        the default: rank 0 builds it, rank 1 receives a weightless skeleton and its
                 partition of each core parameter from rank 0's broadcast

tests/workers/ds_worker.py reports each rank's resident memory attributable
to the model during start-up (build, frozen-encoder hand-over and ZeRO-3
partitioning, up to the optimizer; imports excluded; see its docstring).
On CPU the "device" is the host heap, so the workers run with a fixed glibc
mmap threshold (MALLOC_MMAP_THRESHOLD_): every large tensor is then its own
mapping, returned to the system when freed, and the peak measures live
tensors rather than the heap's fragmentation after many full-size parameters
were freed (on a GPU those tensors are device memory and never reach the
host heap).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from test_deepspeed import _losses, _reports, _worker_run
from test_deepspeed import ds_env, torch_extensions_dir  # noqa: F401  (fixtures)

MIB = 2**20


@pytest.fixture(scope="module")
def wide_llava(tmp_path_factory) -> Path:
    from vla_scale.models.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("src") / "wide_llava", llm_hidden=1024, llm_layers=4)


@pytest.fixture(scope="module")
def startup_runs(ds_env, wide_llava, tmp_path_factory) -> dict[str, dict]:  # noqa: F811
    env = {**ds_env, "VLA_SCALE_TEST_STARTUP_MEMORY": "1", "MALLOC_MMAP_THRESHOLD_": str(MIB)}
    runs = {}
    for name, every_rank in (("every_rank", "true"), ("rank0", "false")):
        work = tmp_path_factory.mktemp(name)
        _worker_run(env, 2, work / "out", work / "run", wide_llava, "train.steps=2",
                    f"deepspeed.build_on_every_rank={every_rank}", extra_env=env)
        reports = _reports(work / "out")
        runs[name] = {"reports": reports, "losses": _losses(work / "run"),
                      "full_fp32": 4 * sum(t["ds_numel"] for t in reports[0]["trainable"])}
    return runs


@pytest.mark.slow
def test_a_non_zero_rank_never_holds_a_full_fp32_copy_of_the_trainable_model_at_start(startup_runs):
    full = startup_runs["rank0"]["full_fp32"]
    assert full > 150 * MIB  # the model is large enough for the comparison to mean something
    before = startup_runs["every_rank"]["reports"][1]["startup_memory"]["peak"]
    after = startup_runs["rank0"]["reports"][1]["startup_memory"]["peak"]
    # Building on every rank: rank 1 holds at least the whole model (measured 1.5x: the source VLM
    # with its tower, the siamese copy, then its partitions). Rank-0 building: its ZeRO-3 half of
    # the core (0.5x on 2 ranks, the floor) plus one full parameter at a time and DeepSpeed's own
    # buffers (measured 0.6x).
    assert before > full, (before / MIB, full / MIB)
    assert after < 0.75 * full, (after / MIB, full / MIB)


@pytest.mark.slow
def test_building_on_rank_0_trains_exactly_as_building_on_every_rank(startup_runs):
    before, after = startup_runs["every_rank"]["losses"], startup_runs["rank0"]["losses"]
    assert sorted(after) == [1, 2]
    for step in before:
        assert abs(after[step] - before[step]) <= 1e-6, (step, after[step], before[step])
    assert after == before  # in fact bit-exact: rank 0's weights reach every partition unchanged
