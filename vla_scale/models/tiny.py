"""Tiny, randomly initialised source VLMs and tokenizers, built locally.

The demo and the tests never download anything: they build a small model of
the same *family* as the real ones (LLaVA with a SigLIP tower and a Llama LLM,
PaliGemma, Prismatic-style DINOv2 + SigLIP + Llama parts), save it with
`save_pretrained`, and load it back through exactly the same code path a
user's 7B checkpoint takes. Nothing here may be used to shortcut that path.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

# Words the tiny tokenizer should know as whole pieces: the prompts, the
# synthetic tasks' vocabulary, and the action alphabet.
_CORPUS = """
What action should the robot take to pick up the red block ? pick place push open close the drawer
move the blue cube near the green bowl . put the yellow ball in the box . stack the cups .
What colour is the square ? Where is the object ? Which object is left of the other one ?
Point to where the gripper should grasp the handle . The answer is red green blue yellow white black .
left right above below top bottom near far center corner inside outside on under behind front
Is the cup to the left of the plate ? yes no . How many objects are there ? one two three four
( 0.25 , 0.75 ) [ 0.1 , 0.2 , 0.3 , 0.4 ] +0.0312 -0.5000 +1.0000 -0.0001 0.5, -0.0312, 1.0, 0.0,
0 1 2 3 4 5 6 7 8 9 + - . , ; : ! ? ( ) [ ] < > / = _ " '
"""

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def build_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = 384, extra_special: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer that keeps every digit a single token.

    Trained in well under a second on a built-in corpus; returns a
    `PreTrainedTokenizerFast` (saved to `out_dir` when given).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    bos = tok.token_to_id(SPECIAL_TOKENS["bos_token"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if extra_special:
        # Added above the base vocabulary, as real tokenizers (Llama, Gemma) hold their extra tokens.
        hf.add_special_tokens({"additional_special_tokens": list(extra_special)})
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def tiny_siglip_config(image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 3):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, num_channels=3,
    )


def tiny_clip_config(image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 3):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, num_channels=3, projection_dim=hidden,
    )


_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def tiny_dinov2_config(image_size: int = 32, patch_size: int = 8, hidden: int = 24, layers: int = 3):
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=hidden * 2,
        image_size=image_size, patch_size=patch_size, num_channels=3, mlp_ratio=2,
    )


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **special_ids):
    from transformers import LlamaConfig

    # Head dim 64 from 256 wide up (what fused attention kernels expect), GQA 4:1 as in Llama-3;
    # the smallest test models keep 4 heads.
    heads = max(4, hidden // 64)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2 if hidden < 1024 else hidden * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(2, heads // 4),
        max_position_embeddings=2048, tie_word_embeddings=False, **special_ids,
    )


def _special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def build_tiny_llava(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8, seed: int = 0,
                     llm_hidden: int = 64, llm_layers: int = 2, tower: str = "siglip") -> Path:
    """A tiny LLaVA-family VLM (SigLIP or CLIP tower + 2-layer GELU projector + Llama), saved to `out_dir`.

    The CLIP variant follows LLaVA-1.5's conventions: CLS dropped ("default" selection),
    CLIP's own normalisation; SigLIP has no CLS and keeps every token ("full").
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_special=("<image>",))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    if tower not in ("siglip", "clip"):
        raise ValueError(f"tower must be 'siglip' or 'clip', got {tower!r}")
    clip = tower == "clip"
    cfg = LlavaConfig(
        vision_config=(tiny_clip_config if clip else tiny_siglip_config)(image_size, patch_size),
        text_config=tiny_llama_config(len(tok), hidden=llm_hidden, layers=llm_layers, **_special_ids(tok)),
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default" if clip else "full",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    mean, std = (_CLIP_MEAN, _CLIP_STD) if clip else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    _write_image_processor(out, image_size, mean=mean, std=std)
    return out


def build_tiny_paligemma(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny PaliGemma-family VLM (SigLIP tower + linear projector + Gemma), saved to `out_dir`."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(extra_special=("<image>",))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    text = GemmaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, **_special_ids(tok),
    )
    vision = tiny_siglip_config(image_size, patch_size)
    vision.projection_dim = 64
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                          projection_dim=64, hidden_size=64)
    cfg.text_config.vocab_size = len(tok)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _write_image_processor(out, image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return out


def build_tiny_parts(out_dir: str | os.PathLike, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> dict[str, Path]:
    """Prismatic-style parts: a DINOv2 folder, a SigLIP folder and a Llama folder (with tokenizer)."""
    from transformers import Dinov2Model, LlamaForCausalLM, SiglipVisionModel

    out = Path(out_dir)
    torch.manual_seed(seed)
    paths = {"dinov2": out / "dinov2", "siglip": out / "siglip", "llm": out / "llm"}
    Dinov2Model(tiny_dinov2_config(image_size, patch_size)).eval().save_pretrained(str(paths["dinov2"]))
    _write_image_processor(paths["dinov2"], image_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    SiglipVisionModel(tiny_siglip_config(image_size, patch_size)).eval().save_pretrained(str(paths["siglip"]))
    _write_image_processor(paths["siglip"], image_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    tok = build_tokenizer()
    LlamaForCausalLM(tiny_llama_config(len(tok), **_special_ids(tok))).eval().save_pretrained(str(paths["llm"]))
    tok.save_pretrained(str(paths["llm"]))
    return paths


def _write_image_processor(folder: Path, size: int, mean, std) -> None:
    """A minimal preprocessor_config.json so the encoder's normalisation travels with it."""
    import json

    (Path(folder) / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": list(mean), "image_std": list(std), "size": {"height": size, "width": size},
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
    }, indent=2))
