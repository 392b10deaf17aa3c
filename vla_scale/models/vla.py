"""The dual-encoder VLA, split the way distributed training needs it.

    z = concat(phi_1(o), ..., phi_k(o))   per patch, in config order
    image tokens = projector(z), placed as the source VLM family placed them
    (`SequenceLayout`): LLaVA/Prismatic [BOS][image][text], causal;
    PaliGemma [image][BOS][prompt][answer], image + prompt attending both
    ways (prefix-LM), the answer causally, positions counted from 1.

`VisionLanguageActionModel` holds two children that are never mixed:
- `frozen`: the frozen encoders (`FrozenEncoders`): eval mode, no gradients,
  run under `torch.no_grad()`, never given to an optimizer or to a ZeRO-3
  engine (replicated on every rank, 2 bytes/parameter in bf16 on GPU);
- `core`: everything trained (`VLACore`: trainable encoders, projector,
  LLM). A training strategy wraps `core` alone.

Several cameras and the robot state: `pixel_values` may be (B, C, 3, H, W), C cameras in
`data.cameras` order; each camera goes through every encoder and the projector on its own and its
patch tokens follow the previous camera's, so the image prefix is C x P tokens. With a state
projection (`model.state_dim` > 0) one more prefix token, a linear map of the normalised state,
follows the cameras. `image_mask` (B, C) and `state_mask` (B,) say which of those a sample has
(a text-only VL sample has no image, a VL sample no wrist camera and no state): absent ones are
masked out of attention and, since position ids count real tokens only, the LLM computes exactly
what it would with them left out.

The loss is cross-entropy on answer tokens (labels != -100) only, and the LM
head is applied only at those positions: a 7B model with a 32k vocabulary
never materialises (batch x sequence x vocabulary) logits in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vla_scale.models.projector import Projector
from vla_scale.models.vision import VisionEncoder

IGNORE_INDEX = -100


def count_answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Answer tokens the loss is taken over in a batch of `labels` (what `VLACore.forward` predicts).

    Text position 0 (BOS) is never a target, in every layout (`VLACore.embed` ignores its label).
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum()


#: LLM families whose Hugging Face SDPA mask, for a padded batch without a cache, is exactly
#: `padded_causal_mask`'s (full causal attention; Mistral's sliding window is checked per call)
_PLAIN_CAUSAL = ("llama", "mistral", "qwen2", "gemma")


def padded_causal_mask(attention_mask: torch.Tensor, config: Any) -> torch.Tensor:
    """The attention mask to give a causal LLM for a padded batch without a cache (training, a prefill).

    From a 2-D padding mask (B, T), Hugging Face's SDPA path builds the boolean (B, 1, T, T) mask
    `key <= query and key is not padding` by `vmap` over index functions, which costs 7-15 ms per
    forward for the demo's batches on one CPU core (6-7% of a training step of the tiny models). This
    builds the same tensor in two ops; Hugging Face uses a 4-D mask as given, so the LLM computes
    exactly what it computed before (tested element for element, mask and hidden states). The 2-D mask
    comes back unchanged where Hugging Face would build something else or nothing: nothing padded (it
    then passes no mask and `is_causal`), other attention implementations (flash-attention unpads with
    the 2-D mask; eager wants an additive mask), other families (sliding windows, soft-capping) and a
    sliding window shorter than the batch.
    """
    cfg = getattr(config, "get_text_config", lambda: config)()
    n = attention_mask.shape[-1]
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if (attention_mask.dim() != 2 or getattr(cfg, "_attn_implementation", None) != "sdpa"
            or getattr(cfg, "model_type", None) not in _PLAIN_CAUSAL or (window is not None and n > window)
            or bool(attention_mask.all())):
        return attention_mask
    causal = torch.ones(n, n, dtype=torch.bool, device=attention_mask.device).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def cameras_per_sample(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Camera images each sample has (B,): `image_mask`, else every camera in `pixel_values` ((B, 3, H, W)
    is one, (B, C, 3, H, W) C)."""
    if "image_mask" in batch:
        return batch["image_mask"].long().sum(1)
    px = batch["pixel_values"]
    return torch.full((px.shape[0],), px.shape[1] if px.dim() == 5 else 1, dtype=torch.long)


def prefix_tokens(batch: Mapping[str, torch.Tensor], image_tokens: int) -> torch.Tensor:
    """LLM tokens of each sample's prefix (B,): `image_tokens` per camera the sample has (`image_mask`,
    else every camera in `pixel_values`: (B, 3, H, W) is one, (B, C, 3, H, W) C), plus the state token
    when the batch carries a state for the projection and the sample has one (`state_mask`). Absent
    cameras and states are masked out of attention, like padding, so they are not counted."""
    out = cameras_per_sample(batch) * int(image_tokens)
    if "state" in batch:
        out = out + (batch["state_mask"].long() if "state_mask" in batch else 1)
    return out


@dataclass(frozen=True)
class SequenceLayout:
    """How a source VLM family lays out image and text, and how they attend.

    A property of the source family, recorded in exports, so that training, export and the
    policy all feed the LLM what the source VLM was trained on: its logits at step 0 are
    the source's own.
    """

    name: str
    image_first: bool  # [image][BOS][text] (PaliGemma) rather than [BOS][image][text] (LLaVA, Prismatic)
    prefix_lm: bool  # image + prompt attend both ways, the answer causally (PaliGemma)
    position_offset: int  # the first position id (PaliGemma counts from 1)


LAYOUTS = {
    "llava": SequenceLayout("llava", image_first=False, prefix_lm=False, position_offset=0),
    "paligemma": SequenceLayout("paligemma", image_first=True, prefix_lm=True, position_offset=1),
}


def layout_for_source(source_type: str) -> SequenceLayout:
    """PaliGemma sources keep PaliGemma's layout; LLaVA and Prismatic-style parts put the image after BOS."""
    return LAYOUTS["paligemma" if source_type == "paligemma" else "llava"]


@dataclass
class LLMInputs:
    """One batch as the LLM sees it: image tokens placed by the layout."""

    embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    labels: torch.Tensor | None  # (B, L) or None
    prefix_len: torch.Tensor  # (B,) positions that attend both ways (prefix-LM layouts only)

    def extended(self, embeds: torch.Tensor) -> "LLMInputs":
        """These inputs followed by more (answer) tokens: causal, outside the prefix."""
        mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(embeds.shape[:2])], dim=1)
        return LLMInputs(torch.cat([self.embeds, embeds], dim=1), mask, None, self.prefix_len)

    @staticmethod
    def left_padded(rows: Sequence["LLMInputs"]) -> "LLMInputs":
        """Inference inputs of different lengths as one batch, padded on the left (labels dropped).

        Every row then ends at the same column, so decoding appends columns to all rows at once;
        `VLACore.llm_kwargs` gives each row the positions it has alone, and the pads attend nowhere.
        """
        width = max(r.embeds.shape[1] for r in rows)
        embeds, masks, prefix = [], [], []
        for r in rows:
            pad = width - r.embeds.shape[1]
            embeds.append(F.pad(r.embeds, (0, 0, pad, 0)))
            masks.append(F.pad(r.attention_mask, (pad, 0)))
            prefix.append(r.prefix_len + pad)  # the prefix is counted in columns, pads included
        return LLMInputs(torch.cat(embeds), torch.cat(masks), None, torch.cat(prefix))


def param_numel(p: torch.nn.Parameter) -> int:
    """A parameter's full size, also when ZeRO-3 has partitioned it (its local tensor is then empty)."""
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass
class VLAOutput:
    """Per-batch loss plus per-sample sums, so metrics can be split by data source."""

    loss: torch.Tensor  # summed answer-token cross-entropy / num_items (default: this batch's answer tokens)
    sample_loss_sum: torch.Tensor  # (B,) summed token losses per sample (detached)
    sample_tokens: torch.Tensor  # (B,) answer tokens per sample
    sample_correct: torch.Tensor  # (B,) choice tokens predicted exactly (greedy)
    sample_choices: torch.Tensor  # (B,) answer tokens whose accuracy counts (`choice_mask`; default: all)


class FrozenEncoders(nn.Module):
    """The frozen encoders: outside the optimizer and outside any ZeRO engine."""

    def __init__(self, encoders: Sequence[VisionEncoder]):
        super().__init__()
        self.encoders = nn.ModuleDict({e.spec.name: e for e in encoders})
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenEncoders":
        # Frozen means frozen: dropout and norm statistics never switch to training.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = flat_cameras(images)
        return {name: enc(images) for name, enc in self.encoders.items()}


def flat_cameras(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 3, H, W) camera stacks -> (B*C, 3, H, W), sample-major; (B, 3, H, W) unchanged."""
    return images.flatten(0, 1) if images.ndim == 5 else images


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The optional keyword inputs of `VLACore.forward` found in a collated batch (cameras' and state's
    presence, the state itself): what every strategy passes besides the positional ones."""
    return {k: batch[k] for k in ("image_mask", "state", "state_mask") if k in batch}


class VLACore(nn.Module):
    """Everything that trains: trainable encoders, projector and the causal LM."""

    def __init__(self, trainable_encoders: Sequence[VisionEncoder], projector: Projector, llm: nn.Module,
                 encoder_order: Sequence[str], layout: SequenceLayout = LAYOUTS["llava"]):
        super().__init__()
        self.encoders = nn.ModuleDict({e.spec.name: e for e in trainable_encoders})
        self.projector = projector
        self.llm = llm
        self.encoder_order = list(encoder_order)
        self.layout = layout
        # Set by `attach_state_projection` (model.state_dim > 0): the normalised state as one prefix token.
        self.state_projection: nn.Linear | None = None

    def attach_state_projection(self, state_dim: int) -> None:
        """A trainable (state_dim -> LLM width) linear map; starts at zero so that step 0 is the source VLM's
        computation plus a zero token (its value, not its presence, is what the model learns to use)."""
        width = self.llm.get_input_embeddings().weight.shape[1]
        self.state_projection = nn.Linear(int(state_dim), width)
        nn.init.zeros_(self.state_projection.weight)
        nn.init.zeros_(self.state_projection.bias)

    # -- pieces -----------------------------------------------------------
    def image_tokens(self, images: torch.Tensor, frozen_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected image tokens (B, C*P, H_llm) from images ((B, 3, H, W) or C cameras (B, C, 3, H, W))
        and the frozen encoders' features (computed over the flattened cameras); cameras in order."""
        cameras = images.shape[1] if images.ndim == 5 else 1
        flat = flat_cameras(images)
        feats = []
        proj_dtype = self.projector.layers[0].weight.dtype
        for name in self.encoder_order:
            f = frozen_features[name] if name in frozen_features else self.encoders[name](flat)
            feats.append(f.to(proj_dtype))
        tokens = self.projector(feats)  # (B*C, P, H)
        return tokens.reshape(tokens.shape[0] // cameras, cameras * tokens.shape[1], tokens.shape[2])

    def prefix_tokens(self, images: torch.Tensor, frozen_features: dict[str, torch.Tensor],
                      image_mask: torch.Tensor | None = None, state: torch.Tensor | None = None,
                      state_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything placed where the image goes: the cameras' tokens, then the state token (with a state
        projection and a `state`). Returns (tokens (B, N, H), mask (B, N) or None when all are present)."""
        tokens = self.image_tokens(images, frozen_features)
        b, n = tokens.shape[:2]
        mask = None
        if image_mask is not None:
            per_camera = n // image_mask.shape[1]
            mask = image_mask.to(tokens.device).bool().repeat_interleave(per_camera, dim=1)
        if self.state_projection is not None and state is not None:
            proj = self.state_projection(state.to(self.state_projection.weight.dtype).to(tokens.device))
            tokens = torch.cat([tokens, proj[:, None].to(tokens.dtype)], dim=1)
            present = (torch.ones(b, dtype=torch.bool, device=tokens.device) if state_mask is None
                       else state_mask.to(tokens.device).bool())
            mask = torch.cat([mask if mask is not None else present.new_ones(b, n), present[:, None]], dim=1)
        return tokens, mask

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
              labels: torch.Tensor | None = None, image_mask: torch.Tensor | None = None) -> LLMInputs:
        """Place the image tokens as the layout says. `input_ids` start with BOS.

        The prefix (prefix-LM layouts) is the image plus every text position before the first
        answer token (label != -100); without labels, everything given is prompt. `image_mask`
        (B, P): 0 at image tokens a sample does not have (see the module docstring).
        """
        text = self.llm.get_input_embeddings()(input_ids)
        image_tokens = image_tokens.to(text.dtype)
        b, p = image_tokens.shape[:2]
        ones = attention_mask.new_ones(b, p) if image_mask is None else image_mask.to(attention_mask)
        if self.layout.image_first:
            embeds = torch.cat([image_tokens, text], dim=1)
            mask = torch.cat([ones, attention_mask], dim=1)
        else:
            embeds = torch.cat([text[:, :1], image_tokens, text[:, 1:]], dim=1)
            mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        n_text = input_ids.shape[1]
        if labels is None:
            return LLMInputs(embeds, mask, None, input_ids.new_full((b,), p + n_text))
        answer = labels != IGNORE_INDEX
        answer[:, 0] = False
        first_answer = torch.where(answer.any(1), answer.int().argmax(1), n_text)
        return LLMInputs(embeds, mask, self.place_text_values(labels, p, IGNORE_INDEX), p + first_answer)

    def place_text_values(self, values: torch.Tensor, num_image_tokens: int, fill: Any) -> torch.Tensor:
        """A per-text-position tensor (labels, masks) laid out like the LLM's input: `fill` at the image
        positions and at BOS, which is never a target (see `count_answer_tokens`), wherever it sits."""
        b = values.shape[0]
        image = values.new_full((b, num_image_tokens), fill)
        bos = values.new_full((b, 1), fill)
        parts = [image, bos] if self.layout.image_first else [bos, image]
        return torch.cat([*parts, values[:, 1:]], dim=1)

    def llm_kwargs(self, inputs: LLMInputs, past_mask: torch.Tensor | None = None) -> dict[str, Any]:
        """Keyword arguments for the LLM (or its decoder) over `inputs`, after a KV cache whose columns
        are `past_mask` (B, P): 1 where the cache holds a real token, 0 where it holds padding.

        Position ids count real tokens only, so a left-padded row (batched inference) sits at the
        positions it has alone, and a right-padded one (training) is unchanged. A prefix-LM layout's
        first pass gets an explicit 4-D mask (prefix both ways, the rest causal, padding masked);
        with a cache the new positions are causal over everything before, which is what the LLM
        builds from a 2-D padding mask.
        """
        embeds = inputs.embeds
        n = embeds.shape[1]
        full = inputs.attention_mask if past_mask is None else torch.cat([past_mask, inputs.attention_mask], dim=1)
        positions = (full.long().cumsum(1) - 1).clamp(min=0)[:, -n:] + self.layout.position_offset
        kwargs: dict[str, Any] = {"inputs_embeds": embeds, "position_ids": positions}
        if past_mask is not None and bool(full.all()):
            # Nothing padded (always so for one row): causal over the cache is the LLM's default, and
            # building a mask over the whole cache at every decode step is most of a small model's step.
            return kwargs
        if past_mask is not None:
            kwargs["attention_mask"] = full
            return kwargs
        if not self.layout.prefix_lm:
            kwargs["attention_mask"] = padded_causal_mask(full, self.llm.config)
            return kwargs
        i = torch.arange(n, device=embeds.device)
        causal = i[None, :] <= i[:, None]  # (query, key)
        in_prefix = i[None, None, :] < inputs.prefix_len.to(embeds.device)[:, None, None]  # (B, 1, key)
        # A key in the prefix is visible from every query: from prefix queries (both ways) and
        # from later ones (causally anyway).
        allowed = (causal[None] | in_prefix) & inputs.attention_mask.bool()[:, None, :]
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
        kwargs["attention_mask"] = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        return kwargs

    def decoder(self) -> nn.Module:
        """The LLM without its head (returns hidden states)."""
        return self.llm.get_decoder() if hasattr(self.llm, "get_decoder") else self.llm.model

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.llm.get_output_embeddings()(hidden)
        cap = getattr(self.llm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- training forward --------------------------------------------------
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor, frozen_features: dict[str, torch.Tensor],
                num_items: torch.Tensor | None = None, choice_mask: torch.Tensor | None = None,
                image_mask: torch.Tensor | None = None, state: torch.Tensor | None = None,
                state_mask: torch.Tensor | None = None) -> VLAOutput:
        """`num_items`: the divisor of the summed token loss. The strategies pass the answer-token
        count of the whole global batch (all micro-batches, all ranks), so that the gradient of an
        optimizer step does not depend on how the batch was split (see `vla_scale.train.strategy`).
        `choice_mask` (like `labels`): the answer positions whose token accuracy is counted (for
        actions, where the grammar leaves a choice); default every answer token."""
        img, prefix_mask = self.prefix_tokens(images, frozen_features, image_mask, state, state_mask)
        inputs = self.embed(input_ids, attention_mask, img, labels, prefix_mask)
        hidden = self.decoder()(**self.llm_kwargs(inputs), use_cache=False).last_hidden_state
        # Position t predicts token t+1; keep only positions whose target is an answer token.
        targets = inputs.labels[:, 1:]
        sel = targets != IGNORE_INDEX
        h = hidden[:, :-1][sel]
        logits = self.head_logits(h).float()
        tgt = targets[sel]
        tok_loss = F.cross_entropy(logits, tgt, reduction="none")
        rows = sel.nonzero(as_tuple=True)[0]
        b = input_ids.shape[0]
        sample_tokens = torch.bincount(rows, minlength=b)
        with torch.no_grad():
            sample_loss_sum = torch.zeros(b, device=tok_loss.device).index_add_(0, rows, tok_loss.detach())
            if choice_mask is None:
                counted = torch.ones_like(tgt, dtype=torch.float32)
            else:
                counted = self.place_text_values(choice_mask, img.shape[1], False)[:, 1:][sel].float()
            correct = (logits.argmax(-1) == tgt).float() * counted
            sample_correct = torch.zeros(b, device=tok_loss.device).index_add_(0, rows, correct)
            sample_choices = torch.zeros(b, device=tok_loss.device).index_add_(0, rows, counted)
        denom = sample_tokens.sum().clamp(min=1) if num_items is None else num_items
        loss = tok_loss.sum() / denom
        return VLAOutput(loss, sample_loss_sum, sample_tokens, sample_correct, sample_choices)


class VisionLanguageActionModel(nn.Module):
    """Frozen encoders + trainable core; `forward(batch)` runs both."""

    def __init__(self, frozen: FrozenEncoders, core: VLACore, image_size: int, num_image_tokens: int):
        super().__init__()
        self.frozen = frozen
        self.core = core
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    def forward(self, batch: dict[str, torch.Tensor], num_items: torch.Tensor | None = None) -> VLAOutput:
        feats = self.frozen(batch["pixel_values"])
        return self.core(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch["labels"], feats,
                         num_items, batch.get("choice_mask"), **model_inputs(batch))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.core.image_tokens(images, self.frozen(images))

    def frozen_parameter_count(self) -> int:
        return sum(param_numel(p) for p in self.frozen.parameters())

    def trainable_parameter_count(self) -> int:
        return sum(param_numel(p) for p in self.core.parameters() if p.requires_grad)
