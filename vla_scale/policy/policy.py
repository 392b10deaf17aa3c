"""`VLAPolicy`: an exported VLA as a robot policy (image + instruction -> action).

Input and output transforms live here: the image is centre-cropped when the
model was trained with the random crop (`vla_scale.data.augment.center_crop`,
as recorded in the export) and resized exactly as in training
(`vla_scale.data.images.to_pixels`), the prompt is built by the same
`PromptBuilder`, decoding is grammar-constrained, and the action is
unnormalised with the dataset's statistics. The returned action is always
finite and well formed, whatever the weights.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from vla_scale.actions import ActionNormalizer
from vla_scale.actions.factory import make_action_tokenizer
from vla_scale.config.schema import ActionConfig
from vla_scale.data.augment import center_crop
from vla_scale.data.images import rgb_array, to_pixels
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.camera_images import PRIMARY_CAMERA
from vla_scale.data.state import STATE_KEY, StateNormalizer, state_text
from vla_scale.errors import ConfigError, DataError
from vla_scale.models.export import load_export
from vla_scale.policy.decoding import BatchDecodeResult, DecodeResult, decode_actions


def select_stats(stats: dict, unnorm_key: str | None) -> tuple[str | None, dict]:
    """The statistics to unnormalise with: one robot dataset's, by name (`unnorm_key`, as in OpenVLA).

    Exports hold {source name: stats}; a single flat stats dict is accepted too.
    """
    if "q01" in stats:
        return None, stats
    if unnorm_key is None:
        if len(stats) != 1:
            raise ConfigError(f"this model was trained on several robot datasets {sorted(stats)}; "
                              "pass unnorm_key= to choose whose action statistics to use")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise ConfigError(f"unnorm_key {unnorm_key!r} is not one of the trained datasets {sorted(stats)}")
    return unnorm_key, stats[unnorm_key]


class VLAPolicy:
    def __init__(self, model, tokenizer, stats: dict, actions: ActionConfig, device: torch.device | str = "cpu",
                 max_length: int = 4096, unnorm_key: str | None = None, center_crop_scale: float | None = None,
                 inputs: dict[str, Any] | None = None, decoder: str = "auto", lean: bool | None = None,
                 cuda_graphs: bool = False):
        self.device = torch.device(device)
        # Cameras (prefix order) and state mode as trained (the export's "inputs"); default: one camera, no state.
        inputs = inputs or {}
        self.cameras = list(inputs.get("cameras") or [PRIMARY_CAMERA])
        self.state_mode = inputs.get("state", "none")
        self.state_bins = int(inputs.get("state_bins", 256))
        self.center_crop_scale = center_crop_scale
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.actions = actions
        self.unnorm_key, chosen = select_stats(stats, unnorm_key)
        self.normalizer = ActionNormalizer.from_stats(chosen)
        self.state_normalizer = None
        if self.state_mode != "none":
            if STATE_KEY not in chosen:
                raise ConfigError(f"this model reads the robot state ({self.state_mode}) but the statistics of "
                                  f"{self.unnorm_key!r} hold none")
            self.state_normalizer = StateNormalizer.from_stats(chosen[STATE_KEY])
        self.action_tokenizer = make_action_tokenizer(actions, tokenizer)
        self.grammar = self.action_tokenizer.grammar(tokenizer.eos_token_id, chunk=actions.chunk)
        self.prompts = PromptBuilder(tokenizer, self.action_tokenizer, max_length)
        # The static decoder's LLM pass: the lean one (`vla_scale.policy.lean`) or the Hugging Face forward
        # (False); None: lean on CPU where the family is supported, the Hugging Face forward elsewhere.
        self.lean = lean
        self.decoder = self._choose_decoder(decoder)
        # The static decoder's whole decode as one captured CUDA graph per batch size and prompt-length bucket
        # (`static_decoding.DecodeGraphs`). Off by default: written for a GPU but not yet run on one (no GPU
        # was available; `benchmarks/run_gpu.sh` tests and times it). On a CPU nothing is captured.
        if cuda_graphs and self.decoder == "eager":
            raise ConfigError("cuda_graphs=True needs the static decoder (decoder='static' or 'auto')")
        if cuda_graphs:
            from vla_scale.policy.static_decoding import DecodeGraphs

            why = DecodeGraphs.unsupported(self.model.core)
            if why is not None:
                raise ConfigError(f"cuda_graphs=True: this model's decode cannot be captured: {why}")
        self.cuda_graphs = bool(cuda_graphs)
        self.last_decode: DecodeResult | None = None  # the last predict_action's decode
        self.last_batch_decode: BatchDecodeResult | None = None  # the last call's, per row

    def _choose_decoder(self, decoder: str) -> str:
        """'static' (preallocated KV cache, grammar on the device, no host sync in the loop on a GPU) or
        'eager' (dynamic cache, grammar on the host): the same actions. 'auto' (kept as 'auto' on CPU and
        decided per call by `uses_static`): static on CUDA; on CPU static where the lean pass
        (`vla_scale.policy.lean`) runs the LLM, the fastest there for any batch (BENCHMARKS.md, 1e), else
        eager for one row and static for batches (1c); eager for LLMs with sliding-window layers.
        torch.compile was not faster on CPU."""
        from vla_scale.policy.lean import LeanDecoder
        from vla_scale.policy.static_decoding import supports_static

        if decoder not in ("auto", "static", "eager"):
            raise ConfigError(f"decoder must be 'auto', 'static' or 'eager', got {decoder!r}")
        if not supports_static(self.model.core):
            if decoder == "static":
                raise ConfigError("decoder='static' needs an LLM without sliding-window layers; use 'eager'")
            return "eager"
        lean = self.lean is not False and LeanDecoder.build(self.model.core) is not None
        if decoder == "auto" and (self.device.type != "cpu" or lean):
            return "static"
        return decoder

    def uses_static(self, rows: int) -> bool:
        """Whether a call with `rows` observations runs the static decoder."""
        return self.decoder == "static" or (self.decoder == "auto" and (rows > 1 or self.cuda_graphs))

    #: CPU batches of at least this many rows feed one token per row per pass (see `pass_width`)
    CPU_NARROW_BATCH = 16

    def pass_width(self, rows: int) -> int | None:
        """The most tokens of one row fed per pass of the static decoder (None: a choice and its whole
        forced run, one pass per choice). On a CPU a batch is compute-bound from about 16 rows: a pass as
        wide as the longest pending forced run pads every other row to it (about 7x the tokens at B = 32
        with random weights), so there each row feeds one token per pass, as `generate` does, and forced
        tokens cost passes. Below that, and on a GPU (weight-bandwidth-bound), forced runs ride along."""
        return 1 if self.device.type == "cpu" and rows >= self.CPU_NARROW_BATCH and not self.cuda_graphs else None

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, unnorm_key: str | None = None,
                        decoder: str = "auto", lean: bool | None = None, cuda_graphs: bool = False) -> "VLAPolicy":
        """Load an export folder (`vla-scale export`); GPU and bf16 when available unless told otherwise."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer, stats, config = load_export(Path(folder))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model.to(dtype)
        # Exports that predate the record were written without a crop setting: no crop.
        crop = config.get("image_preprocessing", {}).get("center_crop_scale")
        return cls(model, tokenizer, stats, ActionConfig(**config["actions"]), device, unnorm_key=unnorm_key,
                   center_crop_scale=crop, inputs=config.get("inputs"), decoder=decoder, lean=lean,
                   cuda_graphs=cuda_graphs)

    @torch.no_grad()
    def predict_action(self, image: np.ndarray, instruction: str, state: np.ndarray | None = None) -> np.ndarray:
        """Unnormalised action: shape (D,), or (T, D) for action chunks (`predict_actions` with one row)."""
        action = self.predict_actions([image], [instruction], None if state is None else [state])[0]
        self.last_decode = self.last_batch_decode.rows[0]
        return action

    @torch.no_grad()
    def predict_actions(self, images: Sequence[Any], instructions: Sequence[str],
                        states: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Unnormalised actions for a batch of observations: shape (B, D), or (B, T, D) for action chunks.

        `images[i]`: the primary camera's image, or {camera: image} naming every camera the model was
        trained with; `states[i]`: the raw robot state, when the model reads it.

        One batched prefill and one batched constrained decode; each row gets the action that
        `predict_action` gives it alone (`decoding.constrained_greedy_batch`).
        """
        if isinstance(instructions, str):  # list("pick up") would be one instruction per character
            raise DataError("predict_actions: instructions is one string; pass a list with one instruction per image")
        images, instructions = list(images), list(instructions)
        if len(images) != len(instructions):
            raise DataError(f"predict_actions: {len(images)} images but {len(instructions)} instructions; "
                            "pass one instruction per image")
        if not images:
            raise DataError("predict_actions: no observations given (empty images and instructions)")
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(self.pixels(image))
            except DataError as err:
                raise DataError(f"predict_actions: images[{i}]: {err}") from None
        norm_states = self._states(states, len(images))
        texts = [None if s is None or self.state_mode != "text" else state_text(s, self.state_bins)
                 for s in norm_states]
        ids = [self.prompts.prompt_ids(self.prompts.robot_prompt(text, st)) for text, st in zip(instructions, texts)]
        state = (torch.from_numpy(np.stack(norm_states)).to(self.device)
                 if self.state_mode == "projection" else None)
        static = self.uses_static(len(ids))
        result = decode_actions(self.model, torch.stack(pixels).to(self.device), ids, self.grammar, state=state,
                                static=static, max_width=self.pass_width(len(ids)) if static else None,
                                lean=self.lean, graphs=self.cuda_graphs and static)
        self.last_batch_decode = result
        chunk = self.actions.chunk if self.actions.chunk > 1 else None
        normalized = np.asarray([self.action_tokenizer.decode(row.ids, chunk=chunk) for row in result.rows],
                                dtype=np.float64)
        return np.asarray(self.normalizer.unnormalize(normalized), dtype=np.float32)

    def _states(self, states: Sequence[np.ndarray] | None, n: int) -> list[np.ndarray | None]:
        if self.state_normalizer is None:
            return [None] * n
        if states is None or len(states) != n:
            raise DataError(f"predict_actions: this model reads the robot state ({self.state_mode}); pass one state "
                            f"per observation (states=)")
        return [self.state_normalizer.normalize(s, f"predict_actions: states[{i}]") for i, s in enumerate(states)]

    def pixels(self, image: Any) -> torch.Tensor:
        """uint8 model input, (3, S, S) or (C, 3, S, S) for several cameras: training's pixel path, with its
        random crop replaced by the centre crop."""
        if len(self.cameras) > 1 or isinstance(image, dict):
            if not isinstance(image, dict) or set(self.cameras) - set(image):
                have = sorted(image) if isinstance(image, dict) else "one image"
                raise DataError(f"this model sees cameras {self.cameras}; pass {{camera: image}} with each (got "
                                f"{have})")
            views = [self._view(image[c]) for c in self.cameras]
            return views[0] if len(views) == 1 else torch.stack(views)
        return self._view(image)

    def _view(self, image: np.ndarray | Image.Image) -> torch.Tensor:
        image = rgb_array(image)  # a malformed image is named before the crop could misread it
        if self.center_crop_scale is not None:
            image = center_crop(Image.fromarray(image), self.center_crop_scale)
        return to_pixels(image, self.model.image_size)

    def __call__(self, observation: dict[str, Any]) -> np.ndarray:
        """Simulator-style call: {"image": HxWx3 uint8 (or "images": {camera: image}), "instruction": str,
        "state": the raw state, for a model that reads it} -> action."""
        image = observation["images"] if "images" in observation else observation["image"]
        return self.predict_action(image, observation["instruction"], observation.get("state"))
