"""Co-training correctness: the objective is a property of the global batch alone.

- every rank's slice (and every micro-batch) of every global batch holds each source in proportion,
  for any number of ranks, and the global batches themselves do not depend on the world size;
- a source whose weight rounds to zero samples is an error at start.
The gradient-equality tests across micro-batch, accumulation and world size are in
tests/test_objective.py (they train).
"""
from __future__ import annotations

import tempfile

import numpy as np
import pytest

from vla_scale.data.mixture import batch_counts, mixing_permutation, slice_counts
from vla_scale.data.pipeline import co_training_dataset, mixture_counts, source_dirs
from vla_scale.errors import DataError

PAPER_MIX = (0.5, 0.25, 0.125, 0.125)


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    d = tmp_path / "tmp"  # streaming's lock files and shared-memory names: one folder per test
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    monkeypatch.setattr(tempfile, "tempdir", str(d))


def _within_one_of_share(counts: np.ndarray, total: np.ndarray, parts: int) -> bool:
    return bool(np.all((counts == total // parts) | (counts == -(-total // parts))))


@pytest.mark.parametrize("counts, ranks, micro", [([16, 8, 4, 4], 8, 1), ([4, 2, 1, 1], 2, 2), ([5, 3, 2], 2, 5),
                                                  ([16, 8, 4, 4], 4, 2), ([7, 5, 3, 1], 4, 4), ([3, 3, 2], 1, 4)])
def test_slice_counts_give_every_rank_and_micro_batch_its_share(counts, ranks, micro):
    plan = slice_counts(counts, ranks, micro)
    c = np.asarray(counts)
    total = c.sum()
    assert plan.shape == (ranks, micro, len(counts))
    assert np.array_equal(plan.sum(axis=(0, 1)), c)  # exactly the global counts
    assert np.all(plan.sum(axis=2) == total // (ranks * micro))  # every micro-batch full
    per_rank = plan.sum(axis=1)
    assert np.all(per_rank.sum(axis=1) == total // ranks)
    assert _within_one_of_share(per_rank, c[None, :], ranks)  # floor or ceil of its share, per rank
    assert _within_one_of_share(plan.reshape(-1, len(c)), c[None, :], ranks * micro)


def test_mixing_permutation_is_a_permutation_that_keeps_order_within_a_source():
    streams = np.array([0] * 16 + [1] * 8 + [2] * 4 + [3] * 4)
    perm = mixing_permutation(streams, ranks=4, micro_per_rank=2)
    assert sorted(perm.tolist()) == list(range(32))
    for s in range(4):
        kept = [p for p in perm if streams[p] == s]
        assert kept == sorted(kept)


def _global_batches(cfg, dirs, ranks: int, n_batches: int):
    """The first `n_batches` global batches as `ranks` simulated ranks read them ((ranks, rank batch) sample ids
    each), the first sample id of every source, and the per-batch counts."""
    from streaming.base.world import World

    from vla_scale.data.streaming_dataset import generate_work_rank_mixed

    rank_batch = cfg.train.global_batch_size // ranks
    dataset, counts = co_training_dataset(cfg, dirs, rank_batch)
    offsets = np.asarray(dataset.sample_offset_per_stream)
    out, epoch = [], 0
    while len(out) < n_batches:
        work = generate_work_rank_mixed(dataset, World(1, ranks, 1, 0), epoch, 0)  # (1, ranks, 1, batches, b)
        for k in range(work.shape[3]):
            batch = work[0, :, 0, k, :]
            if batch.min() >= 0:
                out.append(batch)
        epoch += 1
    return out[:n_batches], offsets, list(counts.values())


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_every_rank_slice_of_50_global_batches_is_mixed(tiny_config, ranks):
    """The paper's mix, global batch 32, micro-batch 2: each rank's slice and micro-batch holds every source
    in proportion (floor or ceil of its share), and the global batches are the same at any world size."""
    sources = ", ".join(f"{{name: {n}, task: {n}, weight: {w}}}"
                        for n, w in zip(("robot", "vqa", "spatial", "affordance"), PAPER_MIX))
    cfg = tiny_config(f"data.sources=[{sources}]", "train.global_batch_size=32", "train.micro_batch_size=2",
                      "data.synthetic.samples_per_source=48")
    dirs = source_dirs(cfg)
    batches, offsets, counts = _global_batches(cfg, dirs, ranks, 50)
    reference, _, _ = _global_batches(cfg, dirs, 1, 50)
    c = np.asarray(counts)
    assert counts == batch_counts(list(PAPER_MIX), 32) == [16, 8, 4, 4]
    micro = 2
    for batch, ref in zip(batches, reference):
        assert sorted(batch.ravel().tolist()) == sorted(ref.ravel().tolist())  # world-size independent
        streams = np.searchsorted(offsets, batch, side="right") - 1  # (ranks, rank batch)
        per_rank = np.stack([np.bincount(row, minlength=len(c)) for row in streams])
        assert np.array_equal(per_rank.sum(axis=0), c)
        assert _within_one_of_share(per_rank, c[None, :], ranks)
        per_micro = np.stack([np.bincount(row[k:k + micro], minlength=len(c))
                              for row in streams for k in range(0, streams.shape[1], micro)])
        assert _within_one_of_share(per_micro, c[None, :], ranks * (streams.shape[1] // micro))


def test_a_source_that_rounds_to_zero_samples_is_an_error_naming_the_smallest_batch(tiny_config):
    sources = "[{name: robot, task: robot, weight: 0.9}, {name: vqa, task: vqa, weight: 0.05}, " \
              "{name: aff, task: affordance, weight: 0.05}]"
    cfg = tiny_config(f"data.sources={sources}", "train.global_batch_size=8", "train.micro_batch_size=8")
    with pytest.raises(DataError, match=r"data\.sources\.2 \('aff', weight 0\.05\) gets 0 samples .* batch of 8; "
                                        r"the smallest global batch that includes it is 14"):
        mixture_counts(cfg)
    # weight 0 is the documented way to switch a source off: no error
    off = tiny_config("data.sources.3.weight=0", "train.global_batch_size=8")
    assert "affordance" not in mixture_counts(off)


def test_robot_token_accuracy_counts_only_positions_where_the_grammar_leaves_a_choice(tiny_config):
    from vla_scale.actions.factory import make_action_tokenizer
    from vla_scale.data.prompts import PromptBuilder
    from vla_scale.models.loading import load_tokenizer
    from vla_scale.models.vla import IGNORE_INDEX

    cfg = tiny_config()
    tok = load_tokenizer(cfg.model.source)
    at = make_action_tokenizer(cfg.actions, tok)
    prompts = PromptBuilder(tok, at, cfg.data.max_length)
    sample = prompts.build_robot("pick up the red block", np.array([0.031, -0.5, 0.0, 0.123, -1.0, 0.25, 1.0]))
    answer = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
    grammar = at.grammar(tok.eos_token_id)
    state, expected = grammar.start, []
    for i in answer:
        expected.append(len(grammar.allowed(state)) > 1)
        state = grammar.advance(state, sample.labels[i])
    assert [sample.choice[i] for i in answer] == expected
    assert not any(sample.choice[i] for i in range(len(sample.labels)) if i not in answer)  # prompt positions
    assert sample.choice[answer[-1]] is False and sample.labels[answer[-1]] == tok.eos_token_id  # EOS is forced
    text = [tok.decode([sample.labels[i]]).strip() for i in answer]
    assert all(not sample.choice[i] for i, t in zip(answer, text) if t == ".")  # the point is forced
    assert 0 < sum(expected) < len(answer)
    vl = prompts.build_vl("what colour is the block?", "red")
    assert vl.choice is None  # text answers: every answer token counts (collate fills it from the labels)
