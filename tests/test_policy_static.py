"""The static-cache decoder (preallocated KV cache, grammar on the device) decodes exactly what the eager one does."""
import numpy as np
import pytest
import torch

from vla_scale.errors import ConfigError
from vla_scale.policy import VLAPolicy
from vla_scale.policy.static_decoding import DeviceGrammar

from test_policy import _export
from test_policy_batched import _observations


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode faster on one thread, and on a shared 2-core machine two OpenMP threads can
    stall each other for milliseconds per matmul."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _same_decodes(a, b):
    assert [(r.ids, r.choices, r.forward_passes) for r in a.rows] == [(r.ids, r.choices, r.forward_passes)
                                                                      for r in b.rows]
    assert a.forward_passes == b.forward_passes


@pytest.mark.parametrize("family, style, extra", [("llava", "fixed", "actions.chunk=1"),
                                                  ("llava", "vla-plus", "actions.chunk=1"),
                                                  ("llava", "fixed", "actions.chunk=2"),
                                                  ("paligemma", "fixed", "actions.chunk=1"),
                                                  ("paligemma", "vla-plus", "actions.chunk=1"),
                                                  ("llava", "fixed", "actions.tokenizer=bins")])
def test_static_decoder_gives_the_eager_decoders_actions_choices_and_passes(family, style, extra, request, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", f"actions.style={style}", extra, family=family)
    eager = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="eager")
    static = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static")
    assert (eager.decoder, static.decoder) == ("eager", "static")
    images, instructions = _observations(5, seed=21)
    want = eager.predict_actions(images, instructions)
    got = static.predict_actions(images, instructions)
    np.testing.assert_array_equal(got, want)
    _same_decodes(static.last_batch_decode, eager.last_batch_decode)
    for image, text in zip(images[:1], instructions[:1]):  # batch of one: the predict_action path
        np.testing.assert_array_equal(static.predict_action(image, text), eager.predict_action(image, text))
        assert (static.last_decode.ids, static.last_decode.forward_passes) == (eager.last_decode.ids,
                                                                               eager.last_decode.forward_passes)
    if style == "fixed" and "bins" not in extra:  # every forced character rides along: one pass per choice
        assert all(r.forward_passes == r.choices < len(r.ids) for r in static.last_batch_decode.rows)


def test_device_grammar_runs_cover_every_forced_token(tiny_llava, tmp_path):
    _export(tiny_llava, tmp_path / "export", "actions.style=fixed")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static")
    g = policy.grammar
    dg = DeviceGrammar.build(g, torch.device("cpu"))
    for s in range(g.num_states):
        run, state = [], s
        while not g.is_done(state) and g.forced(state) is not None:
            run.append(g.forced(state))
            state = g.advance(state, g.forced(state))
        n = int(dg.run_len[s])
        assert dg.run_ids[s, :n].tolist() == run and int(dg.run_end[s]) == state
        assert g.is_done(state) or g.forced(state) is None  # a run ends at a choice or at the end
    with pytest.raises(ConfigError, match="decoder must be"):
        VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="graphs")


def test_a_large_cpu_batch_feeds_one_token_per_pass_and_decodes_the_same_actions(tiny_llava, tmp_path):
    """From 16 rows on a CPU the static decoder feeds one token per row per pass (compute-bound: no
    padding to the longest forced run); the ids are the eager decoder's, only the pass counts grow."""
    _export(tiny_llava, tmp_path / "export", "actions.style=fixed")
    eager = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="eager")
    static = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static")
    assert static.pass_width(VLAPolicy.CPU_NARROW_BATCH) == 1 and static.pass_width(8) is None
    images, instructions = _observations(VLAPolicy.CPU_NARROW_BATCH, seed=4)
    np.testing.assert_array_equal(static.predict_actions(images, instructions),
                                  eager.predict_actions(images, instructions))
    start = len(DeviceGrammar.build(static.grammar, torch.device("cpu")).start_run)  # rides in the prefill
    for row, alone in zip(static.last_batch_decode.rows, eager.last_batch_decode.rows):
        assert (row.ids, row.choices) == (alone.ids, alone.choices)
        last_choice = max(i for i, c in enumerate(static.grammar.choice_positions(row.ids)) if c)
        # The prefill, then one pass per token from after the start run up to the last choice (what follows
        # the last choice is never fed).
        assert row.forward_passes == 1 + last_choice - start > alone.forward_passes
