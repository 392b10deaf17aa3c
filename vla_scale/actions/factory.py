"""The action tokenizer a config asks for (the one place that maps `actions.*` to a class)."""
from __future__ import annotations

from typing import Any

from vla_scale.actions.bin_tokenizer import BinActionTokenizer
from vla_scale.actions.string_tokenizer import StringActionTokenizer


def make_action_tokenizer(actions: Any, tokenizer: Any):
    """`actions` is an `ActionConfig` (or anything with dim/tokenizer/style/decimals)."""
    if actions.tokenizer == "bins":
        return BinActionTokenizer(tokenizer, actions.dim)
    return StringActionTokenizer(tokenizer, actions.dim, decimals=actions.decimals, style=actions.style)
