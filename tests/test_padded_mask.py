"""`padded_causal_mask` gives a causal LLM exactly the mask Hugging Face would build, so the LLM computes
exactly what it did: the mask equals `create_causal_mask`'s element for element, and the decoder's hidden
states are bit-for-bit those of the 2-D mask, for right-padded (training) and left-padded (a batched
prefill) rows; where Hugging Face builds something else, the 2-D mask comes back untouched."""
import pytest
import torch

from vla_scale.models.vla import padded_causal_mask

from test_policy_lean import _config, _decoder


def _padding(rows: int = 4, n: int = 11) -> torch.Tensor:
    mask = torch.ones(rows, n, dtype=torch.long)
    mask[0, 8:] = 0  # right padding (training batches)
    mask[1, 5:] = 0
    mask[2, :3] = 0  # left padding (a batched prefill)
    return mask  # row 3: nothing padded


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_the_mask_is_hugging_faces_and_so_are_the_hidden_states(family):
    from transformers.masking_utils import create_causal_mask

    decoder = _decoder(family)
    mask = _padding()
    torch.manual_seed(1)
    embeds = torch.randn(mask.shape[0], mask.shape[1], decoder.config.hidden_size)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    built = padded_causal_mask(mask, decoder.config)
    assert built.dtype == torch.bool and built.shape == (4, 1, 11, 11)
    theirs = create_causal_mask(config=decoder.config, input_embeds=embeds, attention_mask=mask,
                                cache_position=torch.arange(mask.shape[1]), past_key_values=None,
                                position_ids=positions)
    assert torch.equal(built, theirs)
    with torch.no_grad():
        ref = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        got = decoder(inputs_embeds=embeds, attention_mask=built, position_ids=positions).last_hidden_state
    assert torch.equal(got, ref)


def test_the_2d_mask_comes_back_where_hugging_face_builds_something_else():
    mask = _padding()
    cfg = _config("llama")
    cfg._attn_implementation = "sdpa"
    assert padded_causal_mask(torch.ones(2, 5, dtype=torch.long), cfg).dim() == 2  # nothing padded: is_causal
    for impl in ("eager", "flash_attention_2"):  # additive mask; flash-attention unpads with the 2-D mask
        cfg._attn_implementation = impl
        assert padded_causal_mask(mask, cfg) is mask
    window = _config("mistral")
    window._attn_implementation = "sdpa"
    window.sliding_window = 6  # a window shorter than the batch: Hugging Face masks by distance too
    assert padded_causal_mask(mask, window) is mask
    window.sliding_window = 64
    assert padded_causal_mask(mask, window).dim() == 4
    from transformers import Gemma2Config

    other = Gemma2Config(vocab_size=40, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16)  # soft-capping, alternating windows
    other._attn_implementation = "sdpa"
    assert padded_causal_mask(mask, other) is mask


def test_a_training_forward_is_unchanged(tiny_llava):
    """The VLA's training forward on a right-padded batch: the same loss and gradients as with Hugging
    Face's own mask (the 2-D mask handed to the LLM), to the bit."""
    import vla_scale.models.vla as vla_module
    from vla_scale.config import load_config
    from vla_scale.models.loading import build_vla

    cfg = load_config(None, [f"model.source={tiny_llava}", "model.image_size=32",
                             "model.encoders=[{name: frozen, trainable: false}, {name: trained, trainable: true}]"])
    model, _ = build_vla(cfg.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    batch = {"pixel_values": torch.rand(3, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
             "labels": labels}
    model.train()

    def run():
        model.core.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.core.named_parameters() if p.grad is not None}

    calls = []
    original = vla_module.padded_causal_mask

    def counting(m, c):
        calls.append(original(m, c).dim())
        return original(m, c)

    vla_module.padded_causal_mask = counting
    try:
        loss, grads = run()
        assert calls == [4]  # the built mask was used
        vla_module.padded_causal_mask = lambda m, c: m
        loss_hf, grads_hf = run()
    finally:
        vla_module.padded_causal_mask = original
    assert torch.equal(loss, loss_hf)
    assert grads and grads.keys() == grads_hf.keys() and all(torch.equal(grads[k], grads_hf[k]) for k in grads)


def test_the_vlm_stage_batches_give_the_same_loss_and_gradients(tiny_llava):
    """The source VLM stage's batches (built mask, token ids and pixels kept after first use): the loss and
    gradients of Hugging Face's LLaVA are bit-for-bit those of the 2-D mask and of freshly built batches."""
    import json

    import numpy as np
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    from vla_scale.demo.vlm_stage import VLRecord, _Batcher

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava))
    tok = AutoTokenizer.from_pretrained(str(tiny_llava))
    pre = json.loads((tiny_llava / "preprocessor_config.json").read_text())
    size = int(pre["size"]["height"])
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    records = [VLRecord(images[0], "what colour is the cube?", "red", "vqa"),
               VLRecord(images[1], "is the red cube left of the pad?", "yes", "spatial"),
               VLRecord(images[2], "point to the cube", "(0.25, 0.50)", "affordance")]

    def make():
        return _Batcher(tok, model.config, size, pre["image_mean"], pre["image_std"])

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batcher = make()
    batcher(records)  # fills the caches
    cached = batcher(records)
    fresh = make()(records)
    assert cached.keys() == fresh.keys() and all(torch.equal(cached[k], fresh[k]) for k in cached)
    assert cached["attention_mask"].dim() == 4  # the answers differ in length: padded
    rolled = batcher(records, images=images[1:] + images[:1])  # the reliance check's swapped images
    assert torch.equal(rolled["pixel_values"], make()(records, images=images[1:] + images[:1])["pixel_values"])
    model.train()
    loss, grads = loss_and_grads(cached)
    two_d = dict(cached, attention_mask=(cached["input_ids"] != tok.pad_token_id).long())
    two_d["attention_mask"][:, 0] = 1
    assert torch.equal(cached["attention_mask"][:, 0, -1], two_d["attention_mask"].bool())
    loss_hf, grads_hf = loss_and_grads(two_d)
    assert torch.equal(loss, loss_hf)
    assert grads and all(torch.equal(grads[k], grads_hf[k]) for k in grads)
