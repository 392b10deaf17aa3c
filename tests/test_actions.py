"""Actions: normalization, the string and bin action tokenizers, and the decoding grammar.

Every test uses real tokenizers: the tiny byte-level BPE of `vla_scale.models.tiny`
(Qwen-like, merges "Ġ-"/"Ġ+"), a Llama-like sentencepiece BPE with byte fallback
(merges "▁-"/"▁+"), a Gemma-like Unigram without merged signs, and a word-level
tokenizer without single-digit tokens.
"""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vla_scale.actions import (
    ActionNormalizer,
    ActionParseError,
    BinActionTokenizer,
    StringActionTokenizer,
)
from vla_scale.errors import TokenizerError
from vla_scale.models.tiny import build_tokenizer

D = 7
EDGES = [1.0, -1.0, 0.0, -0.0, 5e-5, -5e-5, 0.99995, -0.99995, 1.7, -3.0, 0.12345, 1e-9]


# -- tokenizers --------------------------------------------------------------------


def _llama_like() -> PreTrainedTokenizerFast:
    """Sentencepiece-style BPE as Llama ships it: '▁' spaces, byte fallback, split digits, merged '▁-'/'▁+'."""
    pieces = ["<unk>", "<s>", "</s>", "▁", *"0123456789.,+-", "▁-", "▁+", "▁What", "▁robot"]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[("▁", "-"), ("▁", "+")],
                               unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _unigram_like() -> PreTrainedTokenizerFast:
    """Gemma-like Unigram with a Metaspace pre-tokenizer and no merged ' -'/' +' pieces."""
    pieces = ["<pad>", "</s>", "<s>", "<unk>", "▁", *"0123456789.,+-", "▁the", "▁robot", "▁pick"]
    tok = Tokenizer(models.Unigram([(p, -float(len(p))) for p in pieces], unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
         pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {"bytelevel": build_tokenizer(), "llama": _llama_like(), "unigram": _unigram_like()}


@pytest.fixture(scope="module")
def tiny(tokenizers):
    return tokenizers["bytelevel"]


def _random_actions(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(-1.0, 1.0, size=shape)


# -- normalizer --------------------------------------------------------------------


def test_normalizer_maps_percentiles_to_unit_range_and_back():
    stats = {"q01": [-2.0, 0.0, 10.0], "q99": [2.0, 1.0, 30.0], "mask": [True, True, False]}
    norm = ActionNormalizer.from_stats(stats)
    raw = np.array([[-2.0, 0.5, 1.0], [2.0, 1.0, 0.0], [0.0, 0.25, 1.0]])
    out = norm.normalize(raw)
    np.testing.assert_allclose(out[:, :2], [[-1.0, 0.0], [1.0, 1.0], [0.0, -0.5]])
    np.testing.assert_array_equal(out[:, 2], raw[:, 2])  # the gripper stays 0/1
    np.testing.assert_allclose(norm.unnormalize(out), raw)
    assert norm.dim == 3 and ActionNormalizer.from_stats(norm.to_stats()).to_stats() == norm.to_stats()


def test_normalizer_clips_and_survives_a_constant_dimension():
    norm = ActionNormalizer.from_stats({"q01": [-1.0, 0.3], "q99": [1.0, 0.3]})
    out = norm.normalize(np.array([[5.0, 0.3], [-7.0, 0.3]]))
    np.testing.assert_array_equal(out, [[1.0, 0.0], [-1.0, 0.0]])
    np.testing.assert_array_equal(norm.unnormalize(out)[:, 1], [0.3, 0.3])


def test_normalizer_from_actions_and_torch():
    rng = np.random.default_rng(0)
    actions = rng.normal(size=(2000, 4)) * [1.0, 2.0, 3.0, 0.0] + [0.0, 1.0, -1.0, 0.5]
    norm = ActionNormalizer.from_actions(actions, mask=[True, True, True, False])
    np.testing.assert_allclose(norm.q01, np.quantile(actions, 0.01, axis=0))
    np.testing.assert_allclose(norm.q99, np.quantile(actions, 0.99, axis=0))
    inside = (actions >= norm.q01) & (actions <= norm.q99)
    back = norm.unnormalize(norm.normalize(actions))
    np.testing.assert_allclose(back[inside], actions[inside], atol=1e-12)
    as_tensor = norm.normalize(torch.tensor(actions, dtype=torch.float32))
    assert isinstance(as_tensor, torch.Tensor) and as_tensor.dtype == torch.float32
    np.testing.assert_allclose(as_tensor.numpy(), norm.normalize(actions), atol=1e-6)


# -- text formats ------------------------------------------------------------------


def test_vla_plus_text_is_the_released_format(tiny):
    tok = StringActionTokenizer(tiny, D, style="vla-plus")
    assert tok.to_text([-0.03123, 0.5, 0, 0.12344, -0.5, 0.25, 1.0]) == "-0.0312,0.5,0.0,0.1234,-0.5,0.25,1.0,"
    assert tok.to_text([-0.0, -0.00001, 3.0, -2.0, 0.00005, 0.99999, 0.1]) == "-0.0,-0.0,1.0,-1.0,0.0001,1.0,0.1,"
    # Literally what the release computes, value by value.
    values = np.random.default_rng(1).uniform(-1, 1, D)
    assert tok.to_text(values) == "".join(str(round(float(x), 4)) + "," for x in values)
    # Past 4 decimals Python's str would write 1e-05; the text stays positional.
    assert StringActionTokenizer(tiny, 2, decimals=6, style="vla-plus").to_text([1e-5, -2e-6]) == "0.00001,-0.000002,"


def test_fixed_text_rounds_half_away_from_zero_on_the_written_decimal(tiny):
    tok = StringActionTokenizer(tiny, 3, style="fixed")
    assert tok.to_text([0.0312, -0.5, 1.0]) == "+0.0312 -0.5000 +1.0000"
    assert tok.to_text([-0.0, -0.00004, 0.0]) == "+0.0000 +0.0000 +0.0000"
    assert tok.to_text([0.00005, -0.00005, 0.12345]) == "+0.0001 -0.0001 +0.1235"
    assert tok.to_text([0.99995, -0.99995, 0.99994]) == "+1.0000 -1.0000 +0.9999"
    assert tok.to_text([7.0, -1.5, 1.0000001]) == "+1.0000 -1.0000 +1.0000"
    # float32 input is read in float32: 5e-5 stays 5e-5, not 4.99999987e-05.
    assert tok.to_text(np.array([5e-5, 0.00015, -0.12345], dtype=np.float32)) == "+0.0001 +0.0002 -0.1235"
    assert StringActionTokenizer(tiny, 2, decimals=2).to_text([0.125, -0.005]) == "+0.13 -0.01"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_non_finite_actions_name_the_dimension(tiny, style, bad):
    tok = StringActionTokenizer(tiny, D, style=style)
    action = np.zeros(D)
    action[4] = bad
    with pytest.raises(ValueError, match="dimension 4"):
        tok.to_text(action)
    chunk = np.zeros((3, D))
    chunk[2, 1] = bad
    with pytest.raises(ValueError, match="step 2, dimension 1"):
        tok.encode(chunk)
    with pytest.raises(ValueError, match="dimension 4"):
        BinActionTokenizer(tiny, D).encode(action)


# -- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [2, 3, 4])
@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
@pytest.mark.parametrize("name", ["bytelevel", "llama", "unigram"])
def test_round_trip_within_half_the_last_decimal(tokenizers, name, style, decimals):
    hf = tokenizers[name]
    tok = StringActionTokenizer(hf, D, decimals=decimals, style=style)
    grammar = tok.grammar()
    rng = np.random.default_rng(decimals)
    rows = [_random_actions(rng, D) for _ in range(30)] + [np.resize(EDGES[i:], D) for i in range(len(EDGES))]
    for action in rows:
        ids = tok.encode(action)
        text = tok.to_text(action)
        # The piece table spells exactly the text, as the LLM's own decoder reads it.
        assert hf.decode(ids, clean_up_tokenization_spaces=False) == text
        decoded = tok.decode(ids + [hf.eos_token_id])
        assert decoded.shape == (D,)
        np.testing.assert_allclose(decoded, np.clip(action, -1, 1), rtol=0, atol=0.5 * 10.0**-decimals + 1e-12)
        np.testing.assert_array_equal(tok.from_text(text), decoded)
        assert tok.to_text(decoded) == text
        assert grammar.is_done(grammar.walk(ids + [hf.eos_token_id]))


@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_chunks_round_trip_in_row_major_order(tiny, style):
    tok = StringActionTokenizer(tiny, D, decimals=3, style=style)
    chunk = _random_actions(np.random.default_rng(5), 4, D)
    text = tok.to_text(chunk)
    assert text.startswith(tok.to_text(chunk[0]))
    decoded = tok.decode(tok.encode(chunk), chunk=4)
    assert decoded.shape == (4, D)
    np.testing.assert_allclose(decoded, chunk, atol=0.5e-3 + 1e-12)
    assert tok.from_text(text, chunk=4).shape == (4, D)
    assert tok.decode(tok.encode(chunk[0]), chunk=1).shape == (D,)  # chunk 1 is the config's 'no chunking'
    assert tok.grammar(chunk=4).accepts(tok.encode(chunk) + [tiny.eos_token_id])
    with pytest.raises(ActionParseError, match="step 2, dimension 0"):
        tok.from_text(tok.to_text(chunk[:2]), chunk=3)
    with pytest.raises(ActionParseError, match="after the last value"):
        tok.decode(tok.encode(chunk), chunk=1)


def test_piece_tables_follow_each_tokenizers_spelling(tokenizers):
    def pieces(name):
        table = StringActionTokenizer(tokenizers[name], D).piece_ids
        return {p: tokenizers[name].convert_ids_to_tokens(i) for p, i in table.items()}

    assert pieces("bytelevel")[" -"] == "Ġ-" and " " not in pieces("bytelevel")
    assert pieces("llama")[" +"] == "▁+" and pieces("llama")["-"] == "-"  # not the byte-fallback <0x2D>
    assert pieces("unigram")[" "] == "▁" and " -" not in pieces("unigram")


# -- the grammar -------------------------------------------------------------------


def _random_walk(grammar, rng: random.Random) -> list[int]:
    state, ids = grammar.start, []
    while not grammar.is_done(state):
        token = rng.choice(grammar.allowed(state))
        ids.append(token)
        state = grammar.advance(state, token)
    return ids


@pytest.mark.parametrize(
    "name,style,decimals,chunk",
    [("bytelevel", "fixed", 4, None), ("bytelevel", "vla-plus", 4, None), ("unigram", "fixed", 2, 2),
     ("llama", "vla-plus", 3, 2)],
)
def test_every_sequence_the_grammar_allows_decodes(tokenizers, name, style, decimals, chunk):
    hf = tokenizers[name]
    tok = StringActionTokenizer(hf, D, decimals=decimals, style=style)
    grammar = tok.grammar(chunk=chunk)
    rng = random.Random(0)
    shape = (D,) if chunk is None else (chunk, D)
    for _ in range(500):
        ids = _random_walk(grammar, rng)
        assert ids[-1] == hf.eos_token_id and hf.eos_token_id not in ids[:-1]
        actions = tok.decode(ids, chunk=chunk)
        assert actions.shape == shape and np.isfinite(actions).all() and np.abs(actions).max() <= 1.0
        # The grammar accepts exactly what encode writes: nothing more.
        assert tok.encode(actions) == ids[:-1]


@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_grammar_tables_agree_with_stepping(tiny, style):
    tok = StringActionTokenizer(tiny, D, style=style)
    grammar = tok.grammar(tiny.eos_token_id)
    allowed, nxt = grammar.allowed_table(), grammar.transition_table()
    assert allowed.dtype == torch.long and allowed.shape == nxt.shape == (grammar.num_states, grammar.width)
    assert grammar.width <= 32
    for state in range(grammar.num_states):
        ids = grammar.allowed(state)
        assert ids == sorted(ids) and ids
        row = allowed[state].tolist()
        assert row == ids + [-1] * (grammar.width - len(ids))
        assert nxt[state, : len(ids)].tolist() == [grammar.advance(state, t) for t in ids]
        assert (tiny.eos_token_id in ids) == (grammar.is_done(state) or grammar.forced(state) == tiny.eos_token_id)
        assert grammar.forced(state) == (ids[0] if len(ids) == 1 else None)
    ids = tok.encode(np.linspace(-1, 1, D))
    assert grammar.allowed_ids(ids) == [tiny.eos_token_id]
    assert grammar.allowed_ids(ids[:-1]) != [tiny.eos_token_id]
    if style == "fixed":
        assert grammar.max_tokens == len(ids) + 1
    with pytest.raises(ActionParseError, match="token 2"):
        grammar.walk(ids[:2] + [tiny.eos_token_id])


def test_fixed_grammar_forces_everything_but_signs_and_digits(tiny):
    tok = StringActionTokenizer(tiny, D, style="fixed")
    grammar, pieces = tok.grammar(), {i: p for p, i in tok.piece_ids.items()}
    state, choices = grammar.start, []
    for token in tok.encode([1.0, -0.5, 0.25, -1.0, 0.0, 0.125, 0.75]) + [tiny.eos_token_id]:
        if grammar.forced(state) is None:
            choices.append(pieces[token])
        state = grammar.advance(state, token)
    # After a leading 1 the decimals are forced zeros; '.' and EOS are never a choice.
    assert choices == [
        "+", "1",
        " -", "0", "5", "0", "0", "0",
        " +", "0", "2", "5", "0", "0",
        " -", "1",
        " +", "0", "0", "0", "0", "0",
        " +", "0", "1", "2", "5", "0",
        " +", "0", "7", "5", "0", "0",
    ]
    assert grammar.is_done(state)


def test_corrupted_text_and_ids_name_the_position(tiny):
    tok = StringActionTokenizer(tiny, 3, style="fixed")
    ids, eos = tok.encode([0.5, -0.25, 1.0]), tiny.eos_token_id
    one_field = len(ids) // 3
    cases = {
        "truncated": ids[:-2],
        "missing field": ids[: 2 * one_field],
        "extra field": ids + ids[one_field:2 * one_field],
        "wrong piece": ids[:2] + [tok.piece_ids["+"]] + ids[3:],
        "unknown id": ids[:4] + [300] + ids[5:],
        "eos inside": ids[:4] + [eos] + ids[5:],
    }
    for what, bad in cases.items():
        with pytest.raises(ActionParseError, match=r"token \d+") as err:
            tok.decode(bad + [eos])
        assert re.search(r"expected", str(err.value)), what
    with pytest.raises(ActionParseError, match="token 4.*not an action token"):
        tok.decode(cases["unknown id"])
    for text, where in [("+0.5000 -0.2500", "character 15"), ("+0.5000 -0.2500 +1.0000 +0.1000", "character 23"),
                        ("+0.5000 -0.2x00 +1.0000", "character 12"), ("+0.50 -0.2500 +1.0000", "character 5"),
                        ("+1.0001 -0.2500 +1.0000", "character 6"), ("-0.0000 +0.0000 +0.0000", "character 6"),
                        ("+0.5000  -0.2500 +1.0000", "character 8"), ("0.5000 -0.2500 +1.0000", "character 0")]:
        with pytest.raises(ActionParseError, match=where):
            tok.from_text(text)
    plus = StringActionTokenizer(tiny, 2, style="vla-plus")
    for text, where in [("0.5,0.25", "character 8"), ("0.50,0.25,", "character 4"), ("1.5,0.0,", "character 2"),
                        ("0.5,,", "character 4"), ("2.0,0.0,", "character 0"), ("0.12345,0.0,", "character 6")]:
        with pytest.raises(ActionParseError, match=where):
            plus.from_text(text)


def test_tokenizer_without_single_digit_tokens_is_refused():
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "10": 2, "23": 3, "4": 4, ".": 5}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    with pytest.raises(TokenizerError, match="single-token digit.*0, 1, 2, 3, 5, 6, 7, 8, 9"):
        StringActionTokenizer(hf, D)


# -- bins ----------------------------------------------------------------------------


def test_bin_tokenizer_round_trips_within_half_a_bin_and_spares_special_tokens():
    hf = build_tokenizer()
    hf.add_special_tokens({"additional_special_tokens": ["<VLA_PROMPT>", "<VLM_PROMPT>"]})
    tok = BinActionTokenizer(hf, D)
    base = hf.vocab_size
    assert len(hf) == base + 2  # the added prompt tokens live above the base vocabulary
    rng = np.random.default_rng(3)
    chunk = np.vstack([_random_actions(rng, 50, D), np.resize(EDGES, (2, D))])
    ids = tok.encode(chunk)
    assert min(ids) >= base - 256 and max(ids) <= base - 1
    assert not set(ids) & set(hf.all_special_ids)
    decoded = tok.decode(ids + [hf.eos_token_id], chunk=len(chunk))
    assert np.abs(decoded - np.clip(chunk, -1, 1)).max() <= 1.0 / 256 + 1e-12
    assert tok.encode([-1.0] * D) == [base - 1] * D and tok.encode([1.0] * D) == [base - 256] * D
    assert tok.decode(tok.encode(decoded[0])).tolist() == decoded[0].tolist()  # centers are fixed points

    grammar = tok.grammar(chunk=2)
    assert grammar.width == 256 and grammar.allowed(grammar.start) == list(range(base - 256, base))
    walk = _random_walk(grammar, random.Random(0))
    assert len(walk) == 2 * D + 1 and tok.decode(walk, chunk=2).shape == (2, D)
    with pytest.raises(ActionParseError, match="token 3"):
        tok.decode(ids[:3] + [hf.convert_tokens_to_ids("<VLA_PROMPT>")] + ids[4:D])
    with pytest.raises(ActionParseError, match="token 6"):
        tok.decode(ids[: D - 1])
    with pytest.raises(TokenizerError, match="special token id"):
        BinActionTokenizer(hf, D, n_bins=base - 2)  # would reach down to </s> and <pad>


@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_grammar_language_is_exactly_what_to_text_writes(tiny, style):
    """Exhaustive for one value at 2 decimals: the accepted texts are the written texts, no more, no less."""
    tok = StringActionTokenizer(tiny, 1, decimals=2, style=style)
    grammar, pieces = tok.grammar(), {i: p for p, i in tok.piece_ids.items()}
    accepted, stack = set(), [(grammar.start, "")]
    while stack:
        state, text = stack.pop()
        for token in grammar.allowed(state):
            if token == tiny.eos_token_id:
                accepted.add(text)
            else:
                stack.append((grammar.advance(state, token), text + pieces[token]))
    grid = np.concatenate([np.linspace(-1, 1, 20001), [-0.0, -1e-9]])
    assert accepted == {tok.to_text([v]) for v in grid}


@pytest.mark.parametrize("style", ["fixed", "vla-plus"])
def test_chunk_length_is_read_from_the_text_when_not_given(tiny, style):
    tok = StringActionTokenizer(tiny, D, decimals=3, style=style)
    chunk = _random_actions(np.random.default_rng(7), 3, D)
    for steps, shape in [(1, (D,)), (3, (3, D))]:
        actions = chunk[0] if steps == 1 else chunk
        text, ids = tok.to_text(actions), tok.encode(actions)
        np.testing.assert_array_equal(tok.from_text(text), tok.from_text(text, chunk=steps))
        assert tok.from_text(text).shape == shape
        np.testing.assert_array_equal(tok.decode(ids + [tiny.eos_token_id]), tok.from_text(text))
    two_steps = tok.to_text(chunk[:2])
    # One value too many or too few: the error says where the whole steps end and how to fix it.
    sep = " " if style == "fixed" else ""
    third = tok.to_text(chunk[2])
    longer = two_steps + sep + (third.split(" ")[0] if style == "fixed" else third.split(",")[0] + ",")
    with pytest.raises(ActionParseError, match=rf"15 values.*step 1 ends at character {len(two_steps)}.*pass chunk="):
        tok.from_text(longer)
    text = tok.to_text(chunk)
    shorter = text.rsplit(" ", 1)[0] if style == "fixed" else text[: text[:-1].rindex(",") + 1]
    ids = _ids_of(tok, shorter)
    with pytest.raises(ActionParseError, match=rf"action tokens hold 20 values.*ends at token {len(ids)}\b"):
        tok.decode(ids)
    with pytest.raises(ActionParseError, match="end after 0 tokens"):
        tok.decode([tiny.eos_token_id])


def _ids_of(tok, text):
    """Token ids of action text through the piece table (longest piece first), as `encode` spells it."""
    ids, start = [], 0
    while start < len(text):
        width = next(w for w in (2, 1) if text[start:start + w] in tok.piece_ids)
        ids.append(tok.piece_ids[text[start:start + width]])
        start += width
    return ids


def test_bin_tokenizer_infers_the_chunk_length_too():
    hf = build_tokenizer()
    tok = BinActionTokenizer(hf, D)
    chunk = _random_actions(np.random.default_rng(8), 3, D)
    assert tok.decode(tok.encode(chunk)).shape == (3, D)
    assert tok.decode(tok.encode(chunk[0])).shape == (D,)
    with pytest.raises(ActionParseError, match=r"token 15.*pass chunk="):
        tok.decode(tok.encode(chunk)[:15])
