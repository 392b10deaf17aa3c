"""OpenVLA-style bin tokens: the baseline action tokenizer, kept for ablations.

Each normalized value in [-1, 1] falls in one of `n_bins` equal-width bins
and is written as one token: bin b is vocabulary id `base_vocab_size - 1 - b`,
the rarely used tail of the LLM's base vocabulary (`tokenizer.vocab_size`,
which excludes added tokens, so prompt tokens such as <VLA_PROMPT> are never
overwritten). Decoding returns the bin's center, within half a bin width
of the clipped input.

OpenVLA's ActionTokenizer (prismatic/vla/action_tokenizer.py) differs: it
takes `np.linspace(-1, 1, 256)` as bin *edges* (255 intervals and 255
centers) and `np.digitize` returns 1..256, so it uses 256 token ids for 255
bins; decoding subtracts 1 and clips, which folds index 256 (only reached
at exactly +1) onto the last center. Its tail of Llama's vocabulary also
holds invisible characters such as U+202D (openvla/openvla#226). Here the
mapping between bins, centers and ids is a bijection, and the grammar
offers exactly these ids, so none of that matters for decoding.

This module must never hand out an id outside the last `n_bins` of the base
vocabulary, nor a special token's id.
"""
from __future__ import annotations

import numpy as np

from vla_scale.actions.grammar import CachedGrammars, TokenLanguage
from vla_scale.actions.string_tokenizer import action_shape, as_action_array
from vla_scale.errors import ActionParseError, ConfigError, TokenizerError


class BinActionTokenizer(CachedGrammars):
    """Actions in [-1, 1] <-> one bin token per value (same interface as StringActionTokenizer, minus text)."""

    def __init__(self, tokenizer, action_dim: int, n_bins: int = 256):
        if int(action_dim) < 1 or int(n_bins) < 2:
            raise ConfigError(f"bin tokenizer needs action_dim >= 1 and n_bins >= 2; got {action_dim}, {n_bins}")
        base = int(tokenizer.vocab_size)
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if n_bins >= base:
            raise TokenizerError(f"tokenizer {name!r} has a base vocabulary of {base}, too small for {n_bins} bins")
        self.tokenizer = tokenizer
        self.action_dim = int(action_dim)
        self.n_bins = int(n_bins)
        self.base_vocab_size = base
        self.eos_token_id = tokenizer.eos_token_id
        # Bin b <-> id base - 1 - b, so the lowest bin ids sit at the very end.
        self.first_id = base - self.n_bins
        clobbered = sorted(i for i in tokenizer.all_special_ids if self.first_id <= i < base)
        if clobbered:
            raise TokenizerError(
                f"tokenizer {name!r}: special token id(s) {clobbered} fall in the last {n_bins} base ids "
                "that bin tokens use; use fewer bins or the string action tokenizer"
            )
        self.width = 2.0 / self.n_bins
        self.bin_centers = -1.0 + (np.arange(self.n_bins) + 0.5) * self.width

    @property
    def token_ids(self) -> range:
        return range(self.first_id, self.base_vocab_size)

    def bins(self, actions) -> np.ndarray:
        """Bin index of each value of (D,) or (T, D) actions, clipped to [-1, 1] first; shape (T, D)."""
        values = np.clip(as_action_array(actions, self.action_dim).astype(np.float64), -1.0, 1.0)
        # +1 lands exactly on the upper edge of the last bin; it belongs to it.
        return np.minimum(np.floor((values + 1.0) / self.width).astype(np.int64), self.n_bins - 1)

    def encode(self, actions) -> list[int]:
        """One id per value, row major (no BOS, no EOS)."""
        return (self.base_vocab_size - 1 - self.bins(actions)).ravel().tolist()

    def decode(self, ids, chunk: int | None = None) -> np.ndarray:
        """Bin centers from ids (trailing EOS stripped); shape (D,) for chunk 1, else (chunk, D).

        Without `chunk`, as many whole actions as there are ids: (D,) for D ids, (T, D) for T*D.
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        while ids and ids[-1] == self.eos_token_id:
            ids.pop()
        if chunk is None:
            steps, extra = divmod(len(ids), self.action_dim)
            if extra or not ids:
                raise ActionParseError(
                    f"action tokens end at token {len(ids)}: {len(ids)} bin tokens are not a whole number of "
                    f"{self.action_dim}-dimensional actions; pass chunk= to say how many steps they must hold"
                )
            chunk = steps
        shape = self._shape(chunk)
        expected = int(np.prod(shape))
        for index, token_id in enumerate(ids[:expected]):
            if not self.first_id <= token_id < self.base_vocab_size:
                raise ActionParseError(
                    f"action token {index}: id {token_id} is not a bin token; expected an id in "
                    f"[{self.first_id}, {self.base_vocab_size - 1}]"
                )
        if len(ids) != expected:
            raise ActionParseError(
                f"action token {min(len(ids), expected)}: expected {expected} bin tokens "
                f"({'x'.join(map(str, shape))}) then EOS, got {len(ids)}"
            )
        bins = self.base_vocab_size - 1 - np.asarray(ids, dtype=np.int64)
        return self.bin_centers[bins].reshape(shape)

    def token_language(self, chunk: int | None = None) -> TokenLanguage:
        fields = int(np.prod(self._shape(chunk)))
        bin_ids = self.token_ids
        return TokenLanguage(
            start=0,
            step=lambda written, token_id: written + 1 if written < fields and token_id in bin_ids else None,
            is_final=lambda written: written == fields,
            token_ids=list(bin_ids),
            names={i: f"bin {self.base_vocab_size - 1 - i}" for i in bin_ids},
        )

    def _shape(self, chunk: int | None) -> tuple[int, ...]:
        return action_shape(chunk, self.action_dim)

    def __repr__(self) -> str:
        return f"BinActionTokenizer(action_dim={self.action_dim}, n_bins={self.n_bins}, ids={self.token_ids})"
