"""The static-cache decoder (preallocated KV cache, grammar on the device) decodes exactly what the eager one does."""
import numpy as np
import pytest
import torch

from vla_scale.errors import ConfigError
from vla_scale.policy import VLAPolicy
from vla_scale.policy.static_decoding import DeviceGrammar

from test_policy import STATS, _export
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


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family, style, lean", [("llava", "fixed", None), ("llava", "vla-plus", None),
                                                 ("llava", "fixed", False), ("paligemma", "fixed", None)])
def test_graphed_decodes_give_the_eager_decoders_actions_and_reuse_their_entry(family, style, lean, device,
                                                                                request, tmp_path):
    """`cuda_graphs=True`: each call pads its prompts to a length bucket and replays one decode per (rows,
    bucket); on a GPU that decode is a captured CUDA graph, on a CPU the same fixed-shape decode runs
    directly. Either way: the eager decoder's actions, ids, choices and passes, for new prompts through the
    same entry, and again after a weight changes in place (the entry is rebuilt: a graph reads the weights
    where they were captured)."""
    from vla_scale.policy.static_decoding import DecodeGraphs

    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", f"actions.style={style}", family=family)
    kw = dict(device=device, dtype=torch.float32)
    eager = VLAPolicy.from_pretrained(tmp_path / "export", decoder="eager", **kw)
    graphed = VLAPolicy.from_pretrained(tmp_path / "export", decoder="static", lean=lean, cuda_graphs=True, **kw)
    graphs = DecodeGraphs.of(graphed.model.core)
    first, second = _observations(4, seed=31), _observations(4, seed=32)
    for images, instructions in (first, second):
        np.testing.assert_array_equal(graphed.predict_actions(images, instructions),
                                      eager.predict_actions(images, instructions))
        _same_decodes(graphed.last_batch_decode, eager.last_batch_decode)
    entries = dict(graphs.entries)
    for image, text in zip(*_observations(2, seed=33)):  # one row: its own entries
        np.testing.assert_array_equal(graphed.predict_action(image, text), eager.predict_action(image, text))
        _same_decodes(graphed.last_batch_decode, eager.last_batch_decode)
    assert all(graphs.entries[k] is e for k, e in entries.items())  # the four-row entries were kept
    rows = {k[0] for k in graphs.entries}
    assert rows == {1, 4} and all(k[1] % DecodeGraphs.BUCKET == 0 for k in graphs.entries)
    with torch.no_grad():  # an in-place update (a training step between evaluations)
        for model in (eager.model, graphed.model):
            model.core.llm.get_decoder().layers[0].mlp.gate_proj.weight.mul_(-1.5)  # in a fused copy
    images, instructions = first
    np.testing.assert_array_equal(graphed.predict_actions(images, instructions),
                                  eager.predict_actions(images, instructions))
    _same_decodes(graphed.last_batch_decode, eager.last_batch_decode)


def test_graphed_decodes_need_the_static_decoder_and_a_capturable_rotary(tiny_llava, tmp_path):
    _export(tiny_llava, tmp_path / "export")
    with pytest.raises(ConfigError, match="cuda_graphs"):
        VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="eager", cuda_graphs=True)
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static")
    llm_config = policy.model.core.llm.config
    llm_config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}  # resizes its tables from the positions
    with pytest.raises(ConfigError, match="rotary"):
        VLAPolicy(policy.model, policy.tokenizer, STATS, policy.actions, decoder="static", cuda_graphs=True)


@pytest.mark.parametrize("family, lean", [("llava", None), ("llava", False), ("paligemma", None)])
def test_a_graphed_decode_never_reads_a_value_back(family, lean, request, tmp_path):
    """What a CUDA graph cannot hold: a value read back to the host inside the decode (`.item()`, `bool()`,
    `.tolist()` all dispatch `_local_scalar_dense` or `is_nonzero`). Checked on the CPU by watching every op
    the captured body runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vla_scale.policy.static_decoding import DecodeGraphs

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", "actions.style=fixed", family=family)
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static", lean=lean,
                                       cuda_graphs=True)
    images, instructions = _observations(3, seed=34)
    policy.predict_actions(images, instructions)
    (entry,) = DecodeGraphs.of(policy.model.core).entries.values()
    with Reads() as watch, torch.no_grad():
        entry.body()
    assert len(watch.ops) > 100  # the whole decode was watched
    # Reads back a value, or sizes its output by one (a sync on a GPU; boolean indexing runs nonzero).
    syncs = ("_local_scalar_dense", "is_nonzero", "aten.item", "aten.nonzero", "masked_select", "aten.unique",
             "repeat_interleave")
    assert not [op for op in watch.ops if any(k in op for k in syncs)]
