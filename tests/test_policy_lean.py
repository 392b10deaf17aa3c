"""The lean decoder pass (`vla_scale.policy.lean`) computes what the Hugging Face decoder computes.

Each supported family is built tiny with random weights; a padded batch is fed as a prefill and then
narrower passes (the static decoder's layout: each pass right-aligned, padding on the left of a row's
block), and each pass's last hidden state is compared with the Hugging Face forward over the whole
sequence at the same column.
"""
import numpy as np
import pytest
import torch

from vla_scale.policy import VLAPolicy
from vla_scale.policy.lean import LeanDecoder
from vla_scale.policy.static_decoding import _visible

from test_policy import _export
from test_policy_batched import _observations


def _config(family: str):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, use_sliding_window=False)
    if family == "gemma":  # (1 + w) norms, scaled embeddings, tanh GELU, head_dim not hidden / heads
        return GemmaConfig(**common, head_dim=32)
    raise ValueError(family)


class _Core:
    """What `LeanDecoder.build` reads from a VLA core: the decoder and the LLM's config."""

    def __init__(self, decoder):
        self._decoder = decoder
        self.llm = decoder

    def decoder(self):
        return self._decoder


def _decoder(family: str, seed: int = 0):
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_config(_config(family), attn_implementation="sdpa").eval()
    with torch.no_grad():  # Gemma starts its norms at 0 (scale 1): give them some spread
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    return model


# Row r's real tokens in each pass (right-aligned in the pass; left of them is padding): a prefill with one
# left-padded row, then passes as wide as the widest row, as the static decoder feeds them.
PASSES = [[9, 7, 9], [2, 1, 0], [1, 3, 1], [1, 1, 2]]


def _layout():
    """Per column: which row holds a real token, and the pass boundaries."""
    widths = [max(p) for p in PASSES]
    real = torch.zeros(3, sum(widths), dtype=torch.bool)
    ends, col = [], 0
    for take, w in zip(PASSES, widths):
        for r, k in enumerate(take):
            real[r, col + w - k:col + w] = True
        col += w
        ends.append(col)
    return real, widths, ends


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_lean_pass_gives_the_hugging_face_hidden_states(family):
    decoder = _decoder(family)
    lean = LeanDecoder.build(_Core(decoder))
    assert lean is not None
    real, widths, ends = _layout()
    torch.manual_seed(1)
    embeds = torch.randn(3, real.shape[1], 64)
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        want = decoder(inputs_embeds=embeds, attention_mask=real.long(), position_ids=positions).last_hidden_state
        cache = lean.new_cache(3, real.shape[1], torch.float32, torch.device("cpu"))
        rotary = lean.rotary_tables(real.shape[1], embeds)
        start = 0
        for p, (w, end) in enumerate(zip(widths, ends)):
            got = lean.forward(embeds[:, start:end], positions[:, start:end], _visible(real[:, :end], start, w, None),
                               start, cache, rotary)
            rows = [r for r in range(3) if PASSES[p][r] > 0]  # a row that fed nothing has no new hidden state
            torch.testing.assert_close(got[rows], want[rows, end - 1], rtol=1e-5, atol=1e-5)
            start = end


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_fused_fp32_norm_is_bit_for_bit_the_models_own(family):
    decoder = _decoder(family)
    lean = LeanDecoder.build(_Core(decoder))
    layer = decoder.layers[1]
    x = torch.randn(4, 5, 64) * 3
    got = lean._norm(x, lean._norm_weight(layer.input_layernorm.weight))
    assert torch.equal(got, layer.input_layernorm(x))
    got = lean._norm(x.to(torch.bfloat16), lean._norm_weight(layer.input_layernorm.weight))  # the written-out form
    assert torch.equal(got, layer.input_layernorm(x.to(torch.bfloat16)))


def test_lean_weights_follow_in_place_updates():
    """The concatenated q/k/v and gate/up copies are rebuilt after an optimizer-style in-place update (the
    trainer's validation decodes with the model it is training)."""
    decoder = _decoder("llama")
    lean = LeanDecoder.build(_Core(decoder))
    embeds = torch.randn(1, 4, 64)
    positions = torch.arange(4)[None]

    def last_hidden():
        cache = lean.new_cache(1, 4, torch.float32, torch.device("cpu"))
        return lean.forward(embeds, positions, _visible(torch.ones(1, 4, dtype=torch.bool), 0, 4, None), 0, cache,
                            lean.rotary_tables(4, embeds))

    with torch.no_grad():
        before = last_hidden()
        decoder.layers[0].mlp.up_proj.weight.mul_(1.5)
        decoder.layers[1].self_attn.k_proj.weight.add_(0.1)
        after = last_hidden()
        want = decoder(inputs_embeds=embeds, position_ids=positions).last_hidden_state[:, -1]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    # A Parameter replaced by another object (`load_state_dict(assign=True)`): followed too.
    proj = decoder.layers[1].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * -2.0)
    with torch.no_grad():
        replaced = last_hidden()
        want = decoder(inputs_embeds=embeds, position_ids=positions).last_hidden_state[:, -1]
    assert not torch.allclose(replaced, after)
    torch.testing.assert_close(replaced, want, rtol=1e-5, atol=1e-5)


def test_unsupported_families_fall_back():
    from transformers import AutoModel, Gemma2Config

    gemma2 = AutoModel.from_config(Gemma2Config(vocab_size=40, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16))
    assert LeanDecoder.build(_Core(gemma2)) is None  # logit soft-capping, sliding layers: not written out here


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_static_decoder_with_and_without_the_lean_pass_decodes_the_same(family, request, tmp_path):
    """The policy's CPU default (lean) and the Hugging Face forward over a StaticCache (the GPU default) give
    the same actions, ids, choices and passes for a batch of different prompts."""
    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", "actions.style=fixed", family=family)
    lean = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="auto")
    hf = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu", decoder="static", lean=False)
    assert lean.decoder == "static" and LeanDecoder.build(lean.model.core) is not None  # auto: static with lean
    images, instructions = _observations(4, seed=5)
    np.testing.assert_array_equal(lean.predict_actions(images, instructions), hf.predict_actions(images, instructions))
    assert [(r.ids, r.choices, r.forward_passes) for r in lean.last_batch_decode.rows] == [
        (r.ids, r.choices, r.forward_passes) for r in hf.last_batch_decode.rows]
    np.testing.assert_array_equal(lean.predict_action(images[0], instructions[0]),
                                  hf.predict_action(images[0], instructions[0]))
