"""The source VLM's own training stage: a tiny LLaVA learns to talk about the simulator's scenes.

The paper starts from a pretrained VLM whose vision features already mean
something; a frozen copy of its encoder keeps them. The demo's source VLM is
built with random weights, so before it becomes a VLA it is trained here as
a plain VLM on question/answer pairs about rendered scenes of the built-in
MuJoCo tabletop (captions, colour questions, spatial relations and
RoboPoint-style points, all answered from the simulator's state: see
`vla_scale.eval.scene_qa`). The result is saved with `save_pretrained` into
its own folder, exactly like any downloaded source VLM, and the VLA is built
from that folder through the usual loading path. Nothing of the VLA (prompt
tags, action tokens) leaks into this stage.

The prompt is the source family's own LLaVA layout: BOS, the image tokens
(one per patch), "USER: {question} ASSISTANT:" and the answer, with the loss
on the answer and EOS only.

This module trains and saves one folder; it never touches the VLA's run.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vla_scale.errors import DataError

IGNORE = -100
STAGE_FILE = "vlm_stage.json"  # written last into the saved folder: its presence means the stage completed


@dataclass
class VLRecord:
    image: np.ndarray  # uint8 (H, W, 3)
    question: str
    answer: str
    kind: str


def read_vl_shards(folders: Sequence[str | Path]) -> list[VLRecord]:
    """Every single-turn record of the given VL shard folders (written by `ShardWriter`), in order."""
    from vla_scale.data.camera_images import decode_camera_image
    from vla_scale.data.streaming_compat import import_streaming

    streaming = import_streaming()
    records = []
    for folder in folders:
        ds = streaming.LocalDataset(local=str(folder))
        for i in range(len(ds)):
            s = ds[i]
            image = decode_camera_image(s["image"], where=f"{folder} sample {i}")
            if image is None:
                continue  # text-only records have nothing to teach about scenes
            for turn in s["turns"]:
                records.append(VLRecord(np.asarray(image.convert("RGB")), turn["question"], turn["answer"],
                                        s["task"]))
    if not records:
        raise DataError(f"no vision-language records in {', '.join(map(str, folders))}")
    return records


class _Batcher:
    """Tokenised, padded batches of VL records in the LLaVA layout, images as normalised floats.

    The stage draws each record several times: a record's token ids and an image's resized pixels are
    kept after their first use (an image by identity, holding a reference so its id cannot be reused),
    and the attention mask is handed to the LLM already built (`padded_causal_mask`)."""

    def __init__(self, tokenizer: Any, config: Any, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.tok = tokenizer
        self.config = config
        self.image_id = int(config.image_token_index)
        self.n_image = int(getattr(config, "image_seq_length", 0) or (image_size // config.vision_config.patch_size) ** 2)
        self.size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._ids: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._pixels: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def ids(self, r: VLRecord) -> tuple[list[int], list[int]]:
        key = (r.question, r.answer)
        if key not in self._ids:
            enc = lambda t: self.tok.encode(t, add_special_tokens=False)  # noqa: E731
            prompt = [self.tok.bos_token_id] + [self.image_id] * self.n_image + enc(f" USER: {r.question} ASSISTANT:")
            answer = enc(" " + r.answer) + [self.tok.eos_token_id]
            self._ids[key] = (prompt + answer, [IGNORE] * len(prompt) + answer)
        return self._ids[key]

    def resized(self, image: np.ndarray) -> torch.Tensor:
        from vla_scale.data.images import to_pixels

        hit = self._pixels.get(id(image))
        if hit is None or hit[0] is not image:
            hit = self._pixels[id(image)] = (image, to_pixels(image, self.size))
        return hit[1]

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        x = torch.stack([self.resized(i) for i in images]).float() / 255.0
        return (x - self.mean) / self.std

    def __call__(self, records: Sequence[VLRecord], images: Sequence[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
        from vla_scale.models.vla import padded_causal_mask

        pairs = [self.ids(r) for r in records]
        width = max(len(i) for i, _ in pairs)
        pad = self.tok.pad_token_id
        ids = torch.full((len(pairs), width), pad, dtype=torch.long)
        labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for k, (i, lab) in enumerate(pairs):
            ids[k, :len(i)], labels[k, :len(lab)], mask[k, :len(i)] = torch.tensor(i), torch.tensor(lab), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": padded_causal_mask(mask, self.config),
                "pixel_values": self.pixels(images if images is not None else [r.image for r in records])}


def _answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over answer tokens (summed per batch, not averaged per sample)."""
    return model(**batch).loss


@torch.no_grad()
def evaluate_vlm(model: Any, batcher: _Batcher, records: Sequence[VLRecord], batch_size: int = 64) -> dict[str, float]:
    """Held-out answer loss, exact-answer accuracy (greedy, teacher-forced per token) and the loss with the
    images of the batch rolled by half the batch: how much the answers depend on the image (the reliance gap)."""
    model.eval()
    loss = shuffled = 0.0
    exact = n = 0
    for k in range(0, len(records), batch_size):
        chunk = list(records[k:k + batch_size])
        batch = batcher(chunk)
        out = model(**batch)
        loss += float(out.loss) * len(chunk)
        if len(chunk) > 1:
            # Each record with the image of the record half the chunk away: another scene (a scene's
            # questions are stored next to each other, so the next record often shows the same scene).
            half = len(chunk) // 2
            rolled = batcher(chunk, images=[r.image for r in chunk[half:] + chunk[:half]])
            shuffled += float(model(**rolled).loss) * len(chunk)
        else:
            shuffled += float(out.loss)
        pred = out.logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        ok = ((pred == target) | (target == IGNORE)).all(dim=1)
        exact += int(ok.sum())
        n += len(chunk)
    model.train()
    return {"loss": loss / n, "exact": exact / n, "shuffled_loss": shuffled / n, "reliance_gap": (shuffled - loss) / n}


def train_vlm(source: str | Path, out: str | Path, train: Sequence[VLRecord], held_out: Sequence[VLRecord], *,
              steps: int, batch_size: int = 32, lr: float = 1e-3, vision_lr: float | None = None, seed: int = 0,
              image_size: int | None = None,
              log: Callable[[str], None] = print, log_every: int = 100) -> dict[str, Any]:
    """Train the LLaVA-family VLM in `source` on `train` records and save it (weights, tokenizer, image
    processor) to `out` with `save_pretrained`. Returns the stage's summary (also written to
    `out/vlm_stage.json`): the held-out loss, exact-answer accuracy and reliance gap before and after."""
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    source, out = Path(source), Path(out)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(str(source))
    tok = AutoTokenizer.from_pretrained(str(source))
    pre = json.loads((source / "preprocessor_config.json").read_text())
    size = image_size or int(pre["size"]["height"])
    batcher = _Batcher(tok, model.config, size, pre["image_mean"], pre["image_std"])
    before = evaluate_vlm(model, batcher, held_out)
    vision = [p for n, p in model.named_parameters() if "vision_tower" in n or "multi_modal_projector" in n]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": vision, "lr": vision_lr or lr}], weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    model.train()
    t0 = time.time()
    curve = []
    for step in range(1, steps + 1):
        idx = rng.choice(len(train), size=min(batch_size, len(train)), replace=False)
        loss = _answer_loss(model, batcher([train[i] for i in idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(float(loss.detach()))
        if step % log_every == 0 or step == steps:
            log(f"VLM stage step {step}/{steps}: answer loss {np.mean(curve[-log_every:]):.3f} "
                f"({time.time() - t0:.0f} s)")
    after = evaluate_vlm(model, batcher, held_out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text((source / "preprocessor_config.json").read_text())
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "vision_lr": vision_lr or lr, "seed": seed, "train_records": len(train),
               "held_out_records": len(held_out), "seconds": round(time.time() - t0, 1),
               "before": before, "after": after, "loss_curve": curve}
    (out / STAGE_FILE).write_text(json.dumps(summary))
    return summary
