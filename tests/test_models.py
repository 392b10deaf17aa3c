"""The dual-encoder VLA built from local Hugging Face checkpoints."""
import copy

import pytest
import torch

from vla_scale.config import load_config
from vla_scale.errors import ModelLoadError
from vla_scale.models.loading import (VLA_PROMPT, VLM_PROMPT, build_vla, choose_attn_implementation,
                                     source_image_features)
from vla_scale.train.strategy import make_optimizer, trainable_parameters

SIAMESE = "model.encoders=[{name: frozen, trainable: false}, {name: trained, trainable: true}]"


def _images(n=3, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_siamese_step0_equals_source_llava(tiny_llava):
    from transformers import LlavaForConditionalGeneration

    cfg = load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32"])
    vla, _ = build_vla(cfg.model)
    src = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval()
    x = _images()
    with torch.no_grad():
        mine = vla.image_tokens(x)
        # The source sees SigLIP-normalised pixels; the VLA's encoders normalise internally.
        theirs = source_image_features(src, x * 2 - 1)
    assert mine.shape == theirs.shape == (3, 16, 64)
    assert (mine - theirs).abs().max().item() < 1e-5
    w = vla.core.projector.layers[0].weight
    assert torch.equal(w[:, :32], w[:, 32:])  # [W/2 | W/2]


def test_siamese_step0_equals_source_paligemma(tiny_paligemma):
    from transformers import PaliGemmaForConditionalGeneration

    enc = ("model.encoders=[{name: f, feature_layer: -1, post_layernorm: true}, "
           "{name: t, trainable: true, feature_layer: -1, post_layernorm: true}]")
    vla, _ = build_vla(load_config(None, [f"model.source={tiny_paligemma}", enc, "model.image_size=32"]).model)
    src = PaliGemmaForConditionalGeneration.from_pretrained(str(tiny_paligemma)).eval()
    x = _images()
    with torch.no_grad():
        diff = (vla.image_tokens(x) - source_image_features(src, x * 2 - 1)).abs().max().item()
    assert diff < 1e-5


def test_paired_parts_concatenate_in_list_order(tiny_parts):
    cfg = load_config(None, [
        "model.source_type=parts", f"model.llm={tiny_parts['llm']}", "model.image_size=32",
        f"model.encoders=[{{name: siglip, path: {tiny_parts['siglip']}}}, "
        f"{{name: dino, path: {tiny_parts['dinov2']}, trainable: true}}]",
        "model.projector.init=random", "model.projector.hidden_dims=[96, 64]"])
    vla, _ = build_vla(cfg.model)
    assert list(vla.frozen.encoders) == ["siglip"] and list(vla.core.encoders) == ["dino"]
    assert vla.core.projector.in_dims == [32, 24]  # SigLIP first, then DINOv2 (CLS dropped)
    x = _images()
    with torch.no_grad():
        s = vla.frozen.encoders["siglip"](x)
        d = vla.core.encoders["dino"](x)
        first = vla.core.projector.layers[0]
        expect = torch.nn.functional.gelu(first(torch.cat([s, d], -1)))
        got = vla.core.projector._first_layer([s, d])
    assert s.shape == (3, 16, 32) and d.shape == (3, 16, 24)
    torch.testing.assert_close(got, expect)


def test_frozen_encoder_is_frozen_and_outside_optimizer(tiny_llava):
    cfg = load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32"])
    vla, tok = build_vla(cfg.model)
    frozen_ids = {id(p) for p in vla.frozen.parameters()}
    assert frozen_ids and not any(p.requires_grad for p in vla.frozen.parameters())
    opt = make_optimizer(trainable_parameters(vla), cfg)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not (frozen_ids & in_opt)
    assert in_opt == {id(p) for p in vla.core.parameters()}
    vla.train()
    assert not vla.frozen.training  # never switches to training mode

    # One real step: the frozen encoder gets no gradient, its weights do not move, no optimizer state.
    before = copy.deepcopy(vla.frozen.state_dict())
    ids = torch.tensor([[tok.bos_token_id, 5, 6, 7, tok.eos_token_id]])
    batch = {"pixel_values": _images(1), "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[-100, -100, 6, 7, tok.eos_token_id]])}
    vla(batch).loss.backward()
    assert all(p.grad is None for p in vla.frozen.parameters())
    assert all(p.grad is not None for p in vla.core.encoders["trained"].parameters() if p.ndim > 1)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in vla.frozen.state_dict().items())
    assert not any(id(p) in frozen_ids for p in opt.state)


def test_prompt_tokens_added_and_embeddings_resized(tiny_llava):
    vla, tok = build_vla(load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32"]).model)
    ids = tok.convert_tokens_to_ids([VLA_PROMPT, VLM_PROMPT])
    assert all(i != tok.unk_token_id for i in ids)
    assert tok.encode(VLA_PROMPT, add_special_tokens=False) == [ids[0]]  # one token, never split
    assert vla.core.llm.get_input_embeddings().weight.shape[0] >= len(tok)


def test_attention_choice_is_sdpa_without_gpu():
    if not torch.cuda.is_available():
        assert choose_attn_implementation("auto") == "sdpa"
    assert choose_attn_implementation("eager") == "eager"


def test_bad_sources_raise_model_load_error(tmp_path, tiny_llava):
    with pytest.raises(ModelLoadError, match="config.json"):
        build_vla(load_config(None, [f"model.source={tmp_path}", SIAMESE]).model)
    with pytest.raises(ModelLoadError, match="built for 32px"):
        build_vla(load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=64"]).model)
    with pytest.raises(ModelLoadError, match="feature_layer"):
        build_vla(load_config(None, [f"model.source={tiny_llava}", "model.encoders=[{name: a, feature_layer: 9}]",
                                     "model.image_size=32"]).model)
