"""The dual-encoder VLA built from local Hugging Face checkpoints."""
import copy

import pytest
import torch

from vla_scale.config import load_config
from vla_scale.errors import ModelLoadError
from vla_scale.models.loading import (VLA_PROMPT, VLM_PROMPT, build_vla, choose_attn_implementation,
                                     source_image_features)
from vla_scale.models.vla import IGNORE_INDEX, count_answer_tokens
from vla_scale.train.plan import build_meta_model, count_parameters
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
    with pytest.raises(ModelLoadError, match="feature_layer"):
        build_vla(load_config(None, [f"model.source={tiny_llava}", "model.encoders=[{name: a, feature_layer: 9}]",
                                     "model.image_size=32"]).model)


# -- step 0: the VLA's LLM logits are the source VLM's ----------------------------------------

PALIGEMMA_ENCODERS = ("model.encoders=[{name: f, feature_layer: -1, post_layernorm: true}, "
                      "{name: t, trainable: true, feature_layer: -1, post_layernorm: true}]")


def _text(tok, answer_lengths=(3, 5)):
    """Two samples with the same tokens and different answer spans (so different prefixes)."""
    ids = ([tok.bos_token_id] + tok.encode("What colour is the square ? The answer is", add_special_tokens=False)
           + tok.encode(" red green blue", add_special_tokens=False) + [tok.eos_token_id])
    ids = torch.tensor([ids, ids])
    labels = ids.clone()
    for row, n in enumerate(answer_lengths):
        labels[row, :-n] = IGNORE_INDEX
    return ids, labels


def _vla_logits(vla, images, ids, labels):
    core = vla.core
    with torch.no_grad():
        inputs = core.embed(ids, torch.ones_like(ids), vla.image_tokens(images), labels)
        return core.llm(**core.llm_kwargs(inputs)).logits


@pytest.mark.parametrize("family", ["llava_siglip", "llava_clip", "paligemma"])
def test_siamese_step0_llm_logits_equal_the_source_vlm(family, request):
    """Same image, same text: the siamese VLA at step 0 gives the source model's logits at every position."""
    from transformers import LlavaForConditionalGeneration, PaliGemmaForConditionalGeneration

    folder = request.getfixturevalue({"llava_siglip": "tiny_llava", "llava_clip": "tiny_llava_clip",
                                      "paligemma": "tiny_paligemma"}[family])
    encoders = PALIGEMMA_ENCODERS if family == "paligemma" else SIAMESE
    vla, tok = build_vla(load_config(None, [f"model.source={folder}", encoders, "model.image_size=32"]).model)
    vla.eval()
    x = _images(2)
    ids, labels = _text(tok)
    mine = _vla_logits(vla, x, ids, labels)
    p = vla.num_image_tokens
    image = torch.full((2, p), tok.convert_tokens_to_ids("<image>"))
    with torch.no_grad():
        if family == "paligemma":
            src = PaliGemmaForConditionalGeneration.from_pretrained(str(folder)).eval()
            # HF's own convention: [image][BOS][prompt][answer]; token_type_ids 0 marks the
            # bidirectional prefix (given with labels, HF builds its training-time prefix-LM mask).
            hf_ids = torch.cat([image, ids], 1)
            token_type = torch.cat([torch.zeros_like(image), (labels != IGNORE_INDEX).long()], 1)
            theirs = src(input_ids=hf_ids, pixel_values=x * 2 - 1, attention_mask=torch.ones_like(hf_ids),
                         token_type_ids=token_type, labels=hf_ids).logits
        else:
            src = LlavaForConditionalGeneration.from_pretrained(str(folder)).eval()
            # LLaVA puts the image where <image> stands; the VLA's prompt has it right after BOS.
            hf_ids = torch.cat([ids[:, :1], image, ids[:, 1:]], 1)
            mean = torch.tensor(vla.frozen.encoders["frozen"].spec.image_mean).view(1, 3, 1, 1)
            std = torch.tensor(vla.frozen.encoders["frozen"].spec.image_std).view(1, 3, 1, 1)
            theirs = src(input_ids=hf_ids, pixel_values=(x - mean) / std,
                         attention_mask=torch.ones_like(hf_ids)).logits
    vocab = theirs.shape[-1]  # the VLA's vocabulary also holds the new prompt tokens
    assert mine.shape[:2] == theirs.shape[:2] == (2, p + ids.shape[1])
    assert (mine[..., :vocab] - theirs).abs().max().item() < 1e-5


def test_paligemma_training_loss_uses_the_prefix_lm_logits(tiny_paligemma):
    """The training forward (LM head at answer positions only) takes its loss from the same logits,
    over exactly `count_answer_tokens` positions."""
    vla, tok = build_vla(load_config(None, [f"model.source={tiny_paligemma}", PALIGEMMA_ENCODERS,
                                            "model.image_size=32"]).model)
    vla.eval()
    x = _images(2)
    ids, labels = _text(tok)
    logits = _vla_logits(vla, x, ids, labels)[:, vla.num_image_tokens:-1]  # position of text t-1 predicts t
    targets = labels[:, 1:]
    sel = targets != IGNORE_INDEX
    expect = torch.nn.functional.cross_entropy(logits[sel].float(), targets[sel], reduction="sum")
    with torch.no_grad():
        out = vla({"pixel_values": x, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    assert int(out.sample_tokens.sum()) == int(count_answer_tokens(labels)) == 8
    torch.testing.assert_close(out.loss * out.sample_tokens.sum(), expect, rtol=1e-5, atol=1e-5)


def test_image_size_other_than_the_towers_interpolates_position_embeddings(tiny_llava):
    """A 32 px source at 64 px: frozen and trained copies agree at step 0 and equal HF's tower
    with interpolate_pos_encoding=True; the planner counts the 64 patches; one training step runs."""
    from transformers import LlavaForConditionalGeneration

    cfg = load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=64"])
    vla, tok = build_vla(cfg.model)
    assert vla.num_image_tokens == 64
    assert count_parameters(build_meta_model(cfg.model)).image_tokens == 64
    tower = LlavaForConditionalGeneration.from_pretrained(str(tiny_llava)).eval().model.vision_tower
    x = _images(2, size=64)
    with torch.no_grad():
        frozen = vla.frozen.encoders["frozen"](x)
        trained = vla.core.encoders["trained"](x)
        theirs = tower(pixel_values=x * 2 - 1, interpolate_pos_encoding=True,
                       output_hidden_states=True).hidden_states[-2]
    assert frozen.shape == (2, 64, 32)
    assert torch.equal(frozen, trained)
    assert (frozen - theirs).abs().max().item() < 1e-5

    opt = make_optimizer(trainable_parameters(vla), cfg)
    ids, labels = _text(tok)
    vla.train()
    out = vla({"pixel_values": x, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in vla.core.encoders["trained"].parameters() if p.ndim > 1)
    opt.step()
