"""Actions: normalization, action tokenizers (text and bins) and the decoding grammar."""
from vla_scale.actions.bin_tokenizer import BinActionTokenizer
from vla_scale.actions.grammar import ActionGrammar, TokenLanguage
from vla_scale.actions.normalizer import ActionNormalizer
from vla_scale.actions.string_tokenizer import STYLES, NonFiniteActionError, StringActionTokenizer
from vla_scale.errors import ActionParseError

__all__ = [
    "ActionGrammar",
    "ActionNormalizer",
    "ActionParseError",
    "BinActionTokenizer",
    "NonFiniteActionError",
    "STYLES",
    "StringActionTokenizer",
    "TokenLanguage",
]
