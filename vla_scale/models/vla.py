"""The dual-encoder VLA, split the way distributed training needs it.

    z = concat(phi_1(o), ..., phi_k(o))   per patch, in config order
    image tokens = projector(z), placed after BOS; text follows.

`VisionLanguageActionModel` holds two children that are never mixed:
- `frozen`: the frozen encoders (`FrozenEncoders`): eval mode, no gradients,
  run under `torch.no_grad()`, never given to an optimizer or to a ZeRO-3
  engine (replicated on every rank, 2 bytes/parameter in bf16 on GPU);
- `core`: everything trained (`VLACore`: trainable encoders, projector,
  LLM). A training strategy wraps `core` alone.

The loss is cross-entropy on answer tokens (labels != -100) only, and the LM
head is applied only at those positions: a 7B model with a 32k vocabulary
never materialises (batch x sequence x vocabulary) logits in training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vla_scale.models.projector import Projector
from vla_scale.models.vision import VisionEncoder

IGNORE_INDEX = -100


def count_answer_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Answer tokens the loss is taken over in a batch of `labels` (what `VLACore.forward` predicts).

    Position 0 (BOS) is never a target: a target at text position t is predicted from t-1.
    """
    return (labels[:, 1:] != IGNORE_INDEX).sum()


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
        return {name: enc(images) for name, enc in self.encoders.items()}


class VLACore(nn.Module):
    """Everything that trains: trainable encoders, projector and the causal LM."""

    def __init__(self, trainable_encoders: Sequence[VisionEncoder], projector: Projector, llm: nn.Module,
                 encoder_order: Sequence[str]):
        super().__init__()
        self.encoders = nn.ModuleDict({e.spec.name: e for e in trainable_encoders})
        self.projector = projector
        self.llm = llm
        self.encoder_order = list(encoder_order)

    # -- pieces -----------------------------------------------------------
    def image_tokens(self, images: torch.Tensor, frozen_features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected image tokens (B, P, H_llm) from images and the frozen encoders' features."""
        feats = []
        proj_dtype = self.projector.layers[0].weight.dtype
        for name in self.encoder_order:
            f = frozen_features[name] if name in frozen_features else self.encoders[name](images)
            feats.append(f.to(proj_dtype))
        return self.projector(feats)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor,
              labels: torch.Tensor | None = None):
        """Splice image tokens after BOS: [BOS][image x P][text...]."""
        text = self.llm.get_input_embeddings()(input_ids)
        image_tokens = image_tokens.to(text.dtype)
        b, p = image_tokens.shape[:2]
        embeds = torch.cat([text[:, :1], image_tokens, text[:, 1:]], dim=1)
        ones = attention_mask.new_ones(b, p)
        mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        if labels is None:
            return embeds, mask, None
        ignore = labels.new_full((b, p), IGNORE_INDEX)
        return embeds, mask, torch.cat([labels[:, :1], ignore, labels[:, 1:]], dim=1)

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
                num_items: torch.Tensor | None = None, choice_mask: torch.Tensor | None = None) -> VLAOutput:
        """`num_items`: the divisor of the summed token loss. The strategies pass the answer-token
        count of the whole global batch (all micro-batches, all ranks), so that the gradient of an
        optimizer step does not depend on how the batch was split (see `vla_scale.train.strategy`).
        `choice_mask` (like `labels`): the answer positions whose token accuracy is counted (for
        actions, where the grammar leaves a choice); default every answer token."""
        img = self.image_tokens(images, frozen_features)
        embeds, mask, full_labels = self.embed(input_ids, attention_mask, img, labels)
        hidden = self.decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        # Position t predicts token t+1; keep only positions whose target is an answer token.
        targets = full_labels[:, 1:]
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
            else:  # the same splice as the labels': image positions never count
                full = torch.cat([choice_mask[:, :1], choice_mask.new_zeros(b, img.shape[1]), choice_mask[:, 1:]], 1)
                counted = full[:, 1:][sel].float()
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
                         num_items, batch.get("choice_mask"))

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.core.image_tokens(images, self.frozen(images))

    def frozen_parameter_count(self) -> int:
        return sum(param_numel(p) for p in self.frozen.parameters())

    def trainable_parameter_count(self) -> int:
        return sum(param_numel(p) for p in self.core.parameters() if p.requires_grad)
