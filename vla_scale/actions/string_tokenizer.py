"""Normalized actions as text, tokenized with the LLM's own digit tokens.

An action (D values in [-1, 1]) or a chunk of T actions (T*D values, row
major) is written as text in one of two styles and read back:

- "fixed": every value as sign, one integer digit, '.', exactly `decimals`
  decimals; values separated by one space: `+0.0312 -0.5000 +1.0000`.
  Rounding rule: half away from zero at `decimals` places, applied to the
  shortest decimal string that round-trips the value in its own precision
  (float32 input is read as float32, anything else as float64), so 0.00005
  is written +0.0001 whatever its binary expansion. Zero (and anything that
  rounds to it) is written with '+': `-0.0000` never appears.
- "vla-plus": the released vla-plus code's text, per value
  `str(round(float(x), decimals)) + ","`, e.g. `-0.0312,0.5,0.0,1.0,`
  (Python's correctly rounded `round`, ties to even on the binary value).
  For decimals > 4 Python's `str` may switch to exponent notation (1e-05);
  those values are written positionally (0.00001) instead, which the
  release never produced since it used 4 decimals.
Values are clipped to [-1, 1] before writing; NaN or inf is an error that
names the dimension.

Token ids never come from `tokenizer(text)`: BPE merges (Llama's "▁-",
Qwen's "Ġ-") make that sequence depend on what surrounds the action. Instead
a piece table maps each piece of the action alphabet to the single
vocabulary id that decodes to exactly that piece, and `encode`, `decode`
and the grammar all go through it. In the fixed style, when the vocabulary
has single tokens for both " +" and " -", a separator and the next sign are
one token (as the tokenizers themselves split such text); otherwise the
separator is its own " " token. Either way each text has exactly one token
sequence, so the grammar never offers two spellings of the same action.

The text syntax of each style is one small character automaton; `from_text`
reads with it, and the token grammar is the same automaton run over the
pieces. It accepts exactly the texts `to_text` can write (e.g. "0.50" or
"+1.0001" are rejected), so reading and writing round-trip.

This module must never call the tokenizer on action text, and never accept
text it could not have written.
"""
from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable, NamedTuple

import numpy as np

from vla_scale.actions.grammar import CachedGrammars, TokenLanguage
from vla_scale.errors import ActionParseError, ConfigError, TokenizerError, VLAScaleError

STYLES = ("fixed", "vla-plus")
# Beyond 8 decimals float64 values stop round-tripping through short text.
MAX_DECIMALS = 8
DIGITS = "0123456789"
# Field count of the syntax that reads text of unknown chunk length (it never reaches its end).
_UNBOUNDED = 1 << 62


class NonFiniteActionError(VLAScaleError, ValueError):
    """An action handed to a tokenizer contains NaN or inf; the message names the dimension."""


def as_action_array(actions, action_dim: int) -> np.ndarray:
    """Actions of shape (D,) or (T, D) (numpy, torch or nested lists) as a (T, D) float array, checked finite.

    float32 (and narrower) input stays float32 so the fixed style reads the
    value in the precision it was stored in; everything else is float64.
    """
    if type(actions).__module__.split(".", 1)[0] == "torch":
        actions = actions.detach().cpu()
        actions = (actions.float() if actions.dtype.itemsize <= 4 else actions.double()).numpy()
    values = np.asarray(actions)
    dtype = np.float32 if values.dtype.kind == "f" and values.dtype.itemsize <= 4 else np.float64
    values = values.astype(dtype)
    if values.ndim not in (1, 2) or values.shape[-1] != action_dim:
        raise ValueError(f"expected actions of shape ({action_dim},) or (T, {action_dim}); got {values.shape}")
    table = values.reshape(-1, action_dim)
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        step, dim = (int(i) for i in bad[0])
        where = f"dimension {dim}" if values.ndim == 1 else f"step {step}, dimension {dim}"
        raise NonFiniteActionError(
            f"action {where} is {table[step, dim]}; actions must be finite (check the data or the normalizer stats)"
        )
    return table


def action_shape(chunk: int | None, action_dim: int) -> tuple[int, ...]:
    """(D,) for one step (chunk None or 1), (chunk, D) for a chunk of several."""
    if chunk is None or int(chunk) == 1:
        return (action_dim,)
    if int(chunk) < 1:
        raise ValueError(f"chunk must be a positive number of action steps or None; got {chunk}")
    return (int(chunk), action_dim)


# -- the text syntax of each style ----------------------------------------------


class _Pos(NamedTuple):
    """A position in the text: in which value, and what may come next."""

    field: int  # index of the value being written; equals the number of values at the end
    phase: str  # "sep", "sign", "int", "dot", "frac" or "end"
    negative: bool = False
    one: bool = False  # integer digit 1: the value is ±1, every decimal is 0
    decimals: int = 0  # decimals written so far
    nonzero: bool = False  # fixed style, negative values: a nonzero decimal was seen
    last_zero: bool = False  # vla-plus: the last decimal written was 0


class _Syntax:
    """A deterministic automaton over characters for `fields` values."""

    alphabet = ""

    def __init__(self, decimals: int, fields: int):
        self.decimals = decimals
        self.fields = fields
        self.start = _Pos(0, "sign")

    def step(self, pos: _Pos, ch: str) -> _Pos | None:
        raise NotImplementedError

    def run(self, pos: _Pos, text: str) -> _Pos | None:
        for ch in text:
            pos = self.step(pos, ch)
            if pos is None:
                return None
        return pos

    def is_final(self, pos: _Pos) -> bool:
        return pos.phase == "end"

    def at_boundary(self, pos: _Pos) -> bool:
        """Between two whole values (the syntax built for `_UNBOUNDED` fields never reaches "end")."""
        return pos.phase == self.after_value and pos.field > 0 and pos.decimals == 0

    def expected(self, pos: _Pos) -> list[str]:
        return [ch for ch in self.alphabet if self.step(pos, ch) is not None]


class _FixedSyntax(_Syntax):
    alphabet = DIGITS + ".+- "
    after_value = "sep"

    def step(self, pos: _Pos, ch: str) -> _Pos | None:
        if pos.phase == "sep":
            return pos._replace(phase="sign") if ch == " " else None
        if pos.phase == "sign":
            return pos._replace(phase="int", negative=ch == "-") if ch in "+-" else None
        if pos.phase == "int":
            return pos._replace(phase="dot", one=ch == "1") if ch in "01" else None
        if pos.phase == "dot":
            return pos._replace(phase="frac") if ch == "." else None
        if pos.phase == "frac" and ch in DIGITS and not (pos.one and ch != "0"):
            # Only a negative value below 1 can end up as the forbidden -0.000...
            nonzero = pos.negative and not pos.one and (pos.nonzero or ch != "0")
            if pos.decimals + 1 < self.decimals:
                return pos._replace(decimals=pos.decimals + 1, nonzero=nonzero)
            if pos.negative and not pos.one and not nonzero:
                return None
            field = pos.field + 1
            return _Pos(field, "sep") if field < self.fields else _Pos(field, "end")
        return None


class _VlaPlusSyntax(_Syntax):
    """Python's repr of round(x, decimals) for x in [-1, 1], each followed by ','."""

    alphabet = DIGITS + ".-,"
    after_value = "sign"

    def step(self, pos: _Pos, ch: str) -> _Pos | None:
        if pos.phase == "sign" and ch == "-":
            return pos._replace(phase="int")
        if pos.phase in ("sign", "int"):
            return _Pos(pos.field, "dot", one=ch == "1") if ch in "01" else None
        if pos.phase == "dot":
            return pos._replace(phase="frac") if ch == "." else None
        if pos.phase != "frac":
            return None
        if ch == ",":
            # repr never ends in a zero, except the lone one of "x.0".
            if pos.decimals == 0 or (pos.last_zero and pos.decimals > 1):
                return None
            field = pos.field + 1
            return _Pos(field, "sign") if field < self.fields else _Pos(field, "end")
        if ch not in DIGITS or pos.decimals == self.decimals:
            return None
        if pos.one and (pos.decimals > 0 or ch != "0"):
            return None
        written = pos.decimals + 1
        if ch == "0" and written == self.decimals and written > 1:
            return None  # a trailing zero here could never be followed by ','
        return pos._replace(decimals=written, last_zero=ch == "0")


_SYNTAX = {"fixed": _FixedSyntax, "vla-plus": _VlaPlusSyntax}


def _write_fixed(value, decimals: int) -> str:
    exact = Decimal(np.format_float_positional(value, unique=True))
    rounded = exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    if rounded.is_zero():
        rounded = rounded.copy_abs()
    return f"{rounded:+.{decimals}f}"


def _write_vla_plus(value, decimals: int) -> str:
    rounded = round(float(value), decimals)
    text = str(rounded)
    if "e" in text:
        text = np.format_float_positional(rounded, unique=True, trim="0")
    return text + ","


def _describe(pieces: list[str], eos: bool = False) -> str:
    """'a digit 0-9', "one of '+', '-'", ...: what may come next, for error messages."""
    digits = [p for p in pieces if len(p) == 1 and p in DIGITS]
    names = [repr(p) for p in pieces if p not in digits] + (["EOS"] if eos else [])
    if len(digits) > 2 and "".join(digits) in DIGITS:
        names.insert(0, f"a digit {digits[0]}-{digits[-1]}")
    else:
        names[:0] = [repr(d) for d in digits]
    if not names:
        return "the end of the text"
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


# -- the piece table --------------------------------------------------------------

# Raw vocabulary strings that can decode to one or two characters of the action
# alphabet: the characters themselves, with a byte-level (Ġ) or sentencepiece (▁)
# space, or a sentencepiece byte-fallback token.
_RAW_CANDIDATE = re.compile(r"[0-9.,+\- Ġ▁]{1,2}|<0x[0-9A-Fa-f]{2}>")
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def find_pieces(tokenizer, wanted: Iterable[str]) -> dict[str, int]:
    """For each wanted piece, the vocabulary id that decodes to exactly it (where one exists).

    A token is decoded after a digit token, not alone: sentencepiece-style
    decoders drop the space of a sequence's first token, so "▁-" alone reads
    "-" but reads " -" mid-text, which is where actions sit. Where several ids
    decode to the same piece, ordinary tokens win over byte-fallback ones,
    then the lowest id. Raises TokenizerError naming any digit that is not a
    single token.
    """
    wanted = set(wanted)
    special = set(tokenizer.all_special_ids)
    candidates = sorted(
        (bool(_BYTE_FALLBACK.fullmatch(raw)), token_id)
        for raw, token_id in tokenizer.get_vocab().items()
        if token_id not in special and _RAW_CANDIDATE.fullmatch(raw)
    )
    ids = [token_id for _, token_id in candidates]
    alone = {token_id: _decode(tokenizer, [token_id]) for token_id in ids}
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    missing = [d for d in DIGITS if d not in alone.values()]
    if missing:
        raise TokenizerError(
            f"tokenizer {name!r} has no single-token digit(s) {', '.join(missing)}: string actions need each "
            "digit 0-9 as its own token (Llama, Qwen and Gemma tokenizers split digits); use a tokenizer that "
            "does, or the bin action tokenizer (actions.tokenizer: bins)"
        )
    digit_ids = [t for t in ids if len(alone[t]) == 1 and alone[t] in DIGITS]
    anchor = next((t for t in digit_ids if _decode(tokenizer, [t, t]) == alone[t] * 2), None)
    if anchor is None:
        pair = _decode(tokenizer, [digit_ids[0], digit_ids[0]])
        raise TokenizerError(
            f"tokenizer {name!r} inserts text between decoded tokens (two {alone[digit_ids[0]]!r} tokens decode "
            f"to {pair!r}), so action text cannot be read token by token"
        )
    prefix = alone[anchor]
    table: dict[str, int] = {}
    for token_id in ids:
        text = _decode(tokenizer, [anchor, token_id])
        piece = text[len(prefix):] if text.startswith(prefix) else None
        if piece in wanted and piece not in table:
            table[piece] = token_id
    return table


def _piece_table(tokenizer, style: str) -> dict[str, int]:
    if style == "fixed":
        found = find_pieces(tokenizer, [*DIGITS, ".", "+", "-", " ", " +", " -"])
        merged = " +" in found and " -" in found
        required = [*DIGITS, ".", "+", "-", *((" +", " -") if merged else (" ",))]
    else:
        found = find_pieces(tokenizer, [*DIGITS, ".", "-", ","])
        required = [*DIGITS, ".", "-", ","]
    missing = [piece for piece in required if piece not in found]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise TokenizerError(
            f"tokenizer {name!r} has no single token for {', '.join(map(repr, missing))}, "
            f"which the {style!r} action style needs"
        )
    return {piece: found[piece] for piece in required}


# -- the tokenizer ----------------------------------------------------------------


class StringActionTokenizer(CachedGrammars):
    """Actions in [-1, 1] <-> text <-> the LLM's own token ids.

    `tokenizer` is the LLM's Hugging Face tokenizer; `style` is "fixed" or
    "vla-plus". Shapes: one action (D,) or a chunk (T, D); `from_text` and
    `decode` return (D,) when `chunk` is 1 (the config's "no chunking") and
    (chunk, D) otherwise. Given no `chunk`, they read as many whole actions as
    the text holds: (D,) for D values, (T, D) for T*D; a count that is not a
    multiple of D is an ActionParseError naming where the text ends.
    Token ids never include BOS or EOS (decode strips trailing EOS).
    """

    def __init__(self, tokenizer, action_dim: int, decimals: int = 4, style: str = "fixed"):
        if style not in STYLES:
            raise ConfigError(f"unknown action text style {style!r}; expected one of {', '.join(STYLES)}")
        if not 1 <= int(decimals) <= MAX_DECIMALS:
            raise ConfigError(f"action decimals must be between 1 and {MAX_DECIMALS}; got {decimals}")
        if int(action_dim) < 1:
            raise ConfigError(f"action_dim must be positive; got {action_dim}")
        self.tokenizer = tokenizer
        self.action_dim = int(action_dim)
        self.decimals = int(decimals)
        self.style = style
        self.eos_token_id = tokenizer.eos_token_id
        self.piece_ids: dict[str, int] = _piece_table(tokenizer, style)
        self._piece_of_id = {token_id: piece for piece, token_id in self.piece_ids.items()}
        self._longest_piece = max(map(len, self.piece_ids))
        self._syntaxes: dict[int, _Syntax] = {}

    # -- text --------------------------------------------------------------

    def to_text(self, actions) -> str:
        """Text of normalized actions (D,) or (T, D), clipped to [-1, 1] first."""
        values = np.clip(as_action_array(actions, self.action_dim), -1.0, 1.0).ravel()
        if self.style == "fixed":
            return " ".join(_write_fixed(v, self.decimals) for v in values)
        return "".join(_write_vla_plus(v, self.decimals) for v in values)

    def from_text(self, text: str, chunk: int | None = None) -> np.ndarray:
        """Actions from text; ActionParseError names the character index and what was expected."""
        syntax = self._syntax(chunk)
        pos = syntax.start
        for index, ch in enumerate(text):
            nxt = syntax.step(pos, ch)
            if nxt is None:
                raise ActionParseError(
                    f"action text {_excerpt(text, index)}, character {index} ({self._where(pos, chunk)}): "
                    f"expected {_describe(syntax.expected(pos))}, found {ch!r}"
                )
            pos = nxt
        if chunk is None and syntax.at_boundary(pos):
            chunk = self._whole_steps(pos.field, lambda k: len(self._text_of_values(text, k)),
                                      f"action text {_excerpt(text, len(text))}", "character", len(text))
        elif not syntax.is_final(pos):
            raise ActionParseError(
                f"action text {_excerpt(text, len(text))} ends at character {len(text)} ({self._where(pos, chunk)}): "
                f"expected {_describe(syntax.expected(pos))}"
            )
        fields = text.split(" ") if self.style == "fixed" else text[:-1].split(",")
        return np.array([float(f) for f in fields], dtype=np.float64).reshape(self._shape(chunk))

    # -- token ids ---------------------------------------------------------

    def encode(self, actions) -> list[int]:
        """Token ids of `to_text(actions)`, from the piece table (no BOS, no EOS)."""
        text, ids, start = self.to_text(actions), [], 0
        while start < len(text):
            for width in range(self._longest_piece, 0, -1):
                token_id = self.piece_ids.get(text[start:start + width])
                if token_id is not None:
                    ids.append(token_id)
                    start += width
                    break
            else:  # the piece table covers everything to_text writes
                raise AssertionError(f"no piece for {text[start:]!r}")
        return ids

    def decode(self, ids, chunk: int | None = None) -> np.ndarray:
        """Actions from token ids (trailing EOS stripped); ActionParseError names the token index."""
        ids = _as_id_list(ids)
        while ids and ids[-1] == self.eos_token_id:
            ids.pop()
        syntax = self._syntax(chunk)
        pos, pieces = syntax.start, []
        for index, token_id in enumerate(ids):
            piece = self._piece_of_id.get(token_id)
            nxt = None if piece is None else syntax.run(pos, piece)
            if nxt is None:
                raise ActionParseError(
                    f"action token {index} ({self._where(pos, chunk)}): id {token_id} "
                    f"({self._token_name(token_id)}), expected {self._expected_pieces(syntax, pos)}"
                )
            pos = nxt
            pieces.append(piece)
        if chunk is None and syntax.at_boundary(pos):
            ends, counted = [0], syntax.start  # ends[k]: the token after which k values are complete
            for index, piece in enumerate(pieces):
                counted = syntax.run(counted, piece)
                if counted.field == len(ends):
                    ends.append(index + 1)
            chunk = self._whole_steps(pos.field, lambda k: ends[k], "action tokens", "token", len(ids))
        elif not syntax.is_final(pos):
            raise ActionParseError(
                f"action tokens end after {len(ids)} tokens ({self._where(pos, chunk)}): "
                f"expected {self._expected_pieces(syntax, pos)} at token {len(ids)}"
            )
        return self.from_text("".join(pieces), chunk)

    # -- grammar -----------------------------------------------------------

    def token_language(self, chunk: int | None = None) -> TokenLanguage:
        syntax = self._syntax(chunk or 1)  # a grammar is finite: no chunk means one step
        return TokenLanguage(
            start=syntax.start,
            step=lambda pos, token_id: syntax.run(pos, self._piece_of_id[token_id]),
            is_final=syntax.is_final,
            token_ids=sorted(self._piece_of_id),
            names=dict(self._piece_of_id),
        )

    # -- helpers -----------------------------------------------------------

    def _shape(self, chunk: int | None) -> tuple[int, ...]:
        return action_shape(chunk, self.action_dim)

    def _syntax(self, chunk: int | None) -> _Syntax:
        """The automaton for `chunk` steps; for None, one that reads any number of values."""
        fields = _UNBOUNDED if chunk is None else int(np.prod(self._shape(chunk)))
        if fields not in self._syntaxes:
            self._syntaxes[fields] = _SYNTAX[self.style](self.decimals, fields)
        return self._syntaxes[fields]

    def _where(self, pos: _Pos, chunk: int | None) -> str:
        if pos.phase == "end":
            return "after the last value"
        step, dim = divmod(pos.field, self.action_dim)
        return f"dimension {dim}" if chunk is not None and len(self._shape(chunk)) == 1 else \
            f"step {step}, dimension {dim}"

    def _text_of_values(self, text: str, k: int) -> str:
        """The first k values of well-formed action text (with the separator that follows them)."""
        sep = " " if self.style == "fixed" else ","
        parts = text.split(sep)
        return sep.join(parts[:k]) + ("," if self.style == "vla-plus" and k else "")

    def _whole_steps(self, values: int, end_of, what: str, unit: str, length: int) -> int:
        """The chunk length of `values` values, or an error naming where the whole steps end."""
        steps, extra = divmod(values, self.action_dim)
        if values and not extra:
            return steps
        where = f"the text ends at {unit} {length}"
        if steps:
            where = f"step {steps - 1} ends at {unit} {end_of(steps * self.action_dim)} and " + where
        raise ActionParseError(
            f"{what} hold {values} values, not a whole number of {self.action_dim}-dimensional actions "
            f"({where}, {self.action_dim - extra} value(s) short of another step): expected "
            f"{self.action_dim} values per action; pass chunk= to say how many steps the text must hold"
        )

    def _expected_pieces(self, syntax: _Syntax, pos: _Pos) -> str:
        return _describe([p for p in self.piece_ids if syntax.run(pos, p) is not None], eos=syntax.is_final(pos))

    def _token_name(self, token_id: int) -> str:
        if token_id in self._piece_of_id:
            return repr(self._piece_of_id[token_id])
        try:
            name = self.tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, OverflowError, TypeError, ValueError):
            name = None
        return f"{name!r}, not an action token" if name is not None else "not in the vocabulary"

    def __repr__(self) -> str:
        return (
            f"StringActionTokenizer(action_dim={self.action_dim}, decimals={self.decimals}, "
            f"style={self.style!r}, pieces={self.piece_ids})"
        )


def _as_id_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _excerpt(text: str, index: int, radius: int = 12) -> str:
    """The text around `index`, short enough for a one-line error."""
    if len(text) <= 2 * radius + 8:
        return repr(text)
    lo = max(0, index - radius)
    return ("..." if lo else "") + repr(text[lo:index + radius]) + ("..." if index + radius < len(text) else "")
