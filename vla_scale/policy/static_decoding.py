"""Grammar-constrained greedy decoding over a preallocated KV cache, with the grammar on the device.

The same decode as `decoding.constrained_greedy_batch` (same choices, same
forced runs riding along, same number of passes per row), arranged so that no
step needs the host:

- the KV cache is one `transformers.StaticCache`, allocated once for
  prompt + the longest action the grammar accepts; every pass writes its
  columns at a known offset (`cache_position`) and attends through an explicit
  4-D mask (padding and not-yet-written columns masked, the layout's
  bidirectional prefix kept), so the LLM builds no mask of its own;
- the grammar lives on the device as tables (`DeviceGrammar`): allowed ids and
  next state per state, and for every state the forced run that follows it
  (ids, length, state after). A choice is `constrained_argmax` over the row's
  allowed ids, the next state a gather, the forced run a gather;
- every pass after the prefill has the same width W = 1 + the longest forced
  run: a row's chosen token and its forced run, right-aligned, padded on the
  left. So a forced run of k tokens still rides in one pass (jump-forward),
  and every pass has one shape (one CUDA graph per shape, when captured);
- the loop runs a fixed number of iterations, the grammar's largest number of
  choices; finished rows keep stepping on padding (the grammar's done state
  is a self-loop). Decoded ids, lengths and pass counts stay on the device
  until the one copy at the end.

On a GPU the loop body is capturable (fixed shapes, no `.item()`, no
`.tolist()`); capturing it in CUDA graphs is not done yet (no GPU to test it
on; see BENCHMARKS.md). On a CPU, where reading a value back costs nothing,
the loop keeps the grammar bookkeeping on the host (list lookups), stops when
every row is done and feeds passes only as wide as the step needs, and each
pass runs the LLM's arithmetic through `lean.LeanDecoder` instead of the
Hugging Face forward (same numbers, a fraction of the per-call overhead);
measured there (`benchmarks/decode.py`, BENCHMARKS.md 1e) it is faster than
the eager decoder for every batch size, so `VLAPolicy` uses it by default.

Not for LLMs with sliding-window layers (their static cache layers are
shorter than the mask): `supports_static` says so and the policy falls back
to the eager decoder. This module must never branch on a device value inside
the loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_scale.kernels import constrained_argmax
from vla_scale.models.vla import LLMInputs
from vla_scale.policy.decoding import BatchDecodeResult, DecodeResult
from vla_scale.policy.lean import LeanDecoder


@dataclass
class DeviceGrammar:
    """An `ActionGrammar` as device tables, plus the host-side constants the loop needs."""

    allowed: torch.Tensor  # (S, K) allowed ids, -1 padded
    nxt: torch.Tensor  # (S, K) next state per allowed id
    run_ids: torch.Tensor  # (S, R) the forced run that follows entering state s (0-padded)
    run_len: torch.Tensor  # (S,) its length
    run_end: torch.Tensor  # (S,) the state after it (a choice state, or done)
    start_run: list[int]  # the forced run from the start state (rides in the prefill)
    start_state: int  # the state after it
    done: int
    max_choices: int  # the most choices any accepted sequence makes
    max_tokens: int  # the longest accepted sequence, EOS included
    host_runs: list[list[int]]  # run_ids / run_end as host lists (the CPU loop's bookkeeping)
    host_ends: list[int]

    @property
    def width(self) -> int:
        """W: a chosen token plus the longest forced run."""
        return 1 + self.run_ids.shape[1]

    @staticmethod
    def build(grammar, device: torch.device) -> "DeviceGrammar":
        cache = grammar.__dict__.setdefault("_device_tables", {})
        if str(device) in cache:
            return cache[str(device)]
        n = grammar.num_states
        runs, ends = [], []
        for s in range(n):
            run = []
            while not grammar.is_done(s) and (t := grammar.forced(s)) is not None:
                run.append(t)
                s = grammar.advance(s, t)
            runs.append(run)
            ends.append(s)
        r = max(1, max(len(run) for run in runs))
        run_ids = torch.zeros((n, r), dtype=torch.long)
        for s, run in enumerate(runs):
            run_ids[s, :len(run)] = torch.tensor(run, dtype=torch.long) if run else run_ids[s, :0]
        # Most choices from each state (the grammar is acyclic apart from done's self-loop).
        memo: dict[int, int] = {}

        def choices(s: int) -> int:
            if grammar.is_done(s):
                return 0
            if s not in memo:
                allowed = grammar.allowed(s)
                memo[s] = (len(allowed) > 1) + max(choices(grammar.advance(s, t)) for t in allowed)
            return memo[s]

        import sys

        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 10 * n + 100))
        try:
            most = choices(grammar.start)
        finally:
            sys.setrecursionlimit(limit)
        table = DeviceGrammar(
            grammar.allowed_table().to(device), grammar.transition_table().to(device), run_ids.to(device),
            torch.tensor([len(x) for x in runs], device=device), torch.tensor(ends, device=device),
            runs[grammar.start], ends[grammar.start], grammar.done, most, grammar.max_tokens, runs, ends)
        cache[str(device)] = table
        return table


def supports_static(core) -> bool:
    """Whether the LLM's cache layers are all full-length (no sliding window), as the 4-D mask assumes."""
    cfg = core.llm.config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(cfg, "sliding_window", None) is None or not getattr(cfg, "use_sliding_window", True)


def _allowed(key_real: torch.Tensor, start: int, width: int, prefix: torch.Tensor | None) -> torch.Tensor:
    """(B, width, L) True where a query at columns [start, start + width) may attend to one of the L cache
    columns: real keys at or before the query, every key of a bidirectional prefix, and the query itself (a
    padding query attends to itself only, so no row of the softmax is empty)."""
    cols = torch.arange(key_real.shape[1], device=key_real.device)
    q = torch.arange(start, start + width, device=key_real.device)
    allowed = key_real[:, None, :] & (cols[None, :] <= q[:, None])[None]
    if prefix is not None:
        allowed = allowed | (key_real & (cols[None, :] < prefix[:, None]))[:, None, :]
    return allowed | (cols[None, :] == q[:, None])[None]


def _mask(key_real: torch.Tensor, start: int, width: int, prefix: torch.Tensor | None,
          dtype: torch.dtype) -> torch.Tensor:
    """`_allowed` as a (B, 1, width, L) additive mask over all L cache columns (the Hugging Face forward's)."""
    allowed = _allowed(key_real, start, width, prefix)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_real.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def _visible(key_real: torch.Tensor, start: int, width: int, prefix: torch.Tensor | None) -> torch.Tensor | None:
    """`_allowed` as a boolean (B or 1, 1, width, L) mask over the L columns written so far (the lean pass's),
    or None where every one is visible (one query, nothing padded). A bidirectional prefix only matters for
    queries inside it, i.e. in the prefill (later queries sit after the whole prefix)."""
    if prefix is not None and start > 0:
        prefix = None
    if prefix is None and bool(key_real.all()):
        if width == 1:
            return None
        cols = torch.arange(key_real.shape[1], device=key_real.device)
        return (cols[None, :] <= torch.arange(start, start + width, device=key_real.device)[:, None])[None, None]
    return _allowed(key_real, start, width, prefix)[:, None]


@torch.no_grad()
def constrained_greedy_static(core, prompts: list[LLMInputs], grammar, sync_every: int | None = None,
                              max_width: int | None = None, lean: bool | None = None) -> BatchDecodeResult:
    """`decoding.constrained_greedy_batch` over a static cache with the grammar on the device.

    `sync_every`: check every N iterations whether all rows are done and stop early (one host sync each
    time); 0 never checks (the loop runs `max_choices` iterations: right for the fixed style on a GPU,
    whose actions all make about the same number of choices). Default: 1 on CPU, where a "sync" is free,
    0 elsewhere. With 1, each pass is also only as wide as the step's longest forced run (not W).

    `max_width` (with `sync_every=1` only): feed at most this many tokens of a row per pass; a row whose
    choice + forced run is longer feeds it over several passes before its next choice. Same ids, more
    passes for that row, far fewer padded tokens when many rows decode together on a CPU (compute-bound).

    `lean`: run each pass with `lean.LeanDecoder` (the LLM's arithmetic without the Hugging Face forward's
    per-call machinery) where the LLM's family is one it writes out; default on CPU only (not yet measured
    or tested on a GPU). False: the Hugging Face forward over a `StaticCache`.
    """
    from transformers import StaticCache

    device = prompts[0].embeds.device
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 0
    adaptive = sync_every == 1  # host reads every step anyway: feed only as wide as this step needs
    if max_width is not None and not adaptive:
        raise ValueError("max_width needs sync_every=1 (the host decides each pass's width)")
    dg = DeviceGrammar.build(grammar, device)
    decoder = core.decoder()
    embed = core.llm.get_input_embeddings()
    head = core.llm.get_output_embeddings()
    bias = getattr(head, "bias", None)
    b, w = len(prompts), dg.width

    start_run = torch.tensor([dg.start_run], dtype=torch.long, device=device)
    inputs = LLMInputs.left_padded([p.extended(embed(start_run)) if dg.start_run else p for p in prompts])
    p_cols = inputs.embeds.shape[1]
    cap = w if max_width is None else max(1, min(int(max_width), w))
    # Every pass after the prefill is at most W (or `cap`) wide; with a cap, a pass happens at most once per
    # decoded token.
    length = p_cols + (max(0, dg.max_choices - 1) * w if cap == w else dg.max_tokens * cap)
    dtype = inputs.embeds.dtype
    key_real = torch.zeros((b, length), dtype=torch.bool, device=device)
    key_real[:, :p_cols] = inputs.attention_mask.bool()
    prefix = inputs.prefix_len.to(device) if core.layout.prefix_lm else None
    offset = core.layout.position_offset
    if lean is None:
        lean = device.type == "cpu"
    lean_decoder = LeanDecoder.build(core) if lean else None

    if lean_decoder is not None:
        lean_cache = lean_decoder.new_cache(b, length, dtype, device)
        rotary = lean_decoder.rotary_tables(length + offset, inputs.embeds)

        def run(embeds: torch.Tensor, start: int) -> torch.Tensor:
            end = start + embeds.shape[1]
            real = key_real[:, :end]  # the columns written so far; later ones are masked anyway
            positions = (real.long().cumsum(1) - 1).clamp(min=0)[:, start:end] + offset
            return lean_decoder.forward(embeds, positions, _visible(real, start, end - start, prefix), start,
                                        lean_cache, rotary)
    else:
        cache = StaticCache(config=core.llm.config, max_cache_len=length)

        def run(embeds: torch.Tensor, start: int) -> torch.Tensor:
            width = embeds.shape[1]
            positions = (key_real.long().cumsum(1) - 1).clamp(min=0)[:, start:start + width] + offset
            out = decoder(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                          attention_mask=_mask(key_real, start, width, prefix, dtype),
                          cache_position=torch.arange(start, start + width, device=device))
            return out.last_hidden_state[:, -1]

    hidden = run(inputs.embeds, 0)
    if adaptive:
        rows = _host_driven_loop(dg, grammar, run, embed, head, bias, hidden, key_real, p_cols, cap)
        return BatchDecodeResult(rows, max(r.forward_passes for r in rows))
    state = torch.full((b,), dg.start_state, dtype=torch.long, device=device)
    max_tokens = dg.max_tokens
    out = torch.zeros((b, max_tokens + 1), dtype=torch.long, device=device)  # the last column takes spills
    out[:, :len(dg.start_run)] = start_run
    out_len = torch.full((b,), len(dg.start_run), dtype=torch.long, device=device)
    done = torch.full((b,), dg.done, dtype=torch.long, device=device)
    passes = torch.ones((b,), dtype=torch.long, device=device)
    choices = torch.zeros((b,), dtype=torch.long, device=device)
    ar = torch.arange(w, device=device)
    cur = p_cols
    for it in range(dg.max_choices):
        finished = state == done
        allowed = dg.allowed.index_select(0, state)
        token = constrained_argmax(hidden.to(head.weight.dtype), head.weight, allowed, bias=bias, validate=False)
        pick = (allowed == token[:, None]).long().argmax(1)
        entered = dg.nxt[state, pick]
        seq = torch.cat([token[:, None], dg.run_ids.index_select(0, entered)], 1)  # (B, W)
        seq_len = 1 + dg.run_len.index_select(0, entered)
        live = ~finished
        cols = torch.where((ar[None] < seq_len[:, None]) & live[:, None], out_len[:, None] + ar[None], max_tokens)
        out.scatter_(1, cols.clamp(max=max_tokens), seq)
        out_len += torch.where(live, seq_len, 0)
        choices += live.long()
        state = torch.where(live, dg.run_end.index_select(0, entered), state)
        if it == dg.max_choices - 1:
            break
        if sync_every and (it + 1) % sync_every == 0 and bool((state == done).all()):
            break
        # Feed each row's new tokens (its choice + forced run), right-aligned, unless it just finished; every
        # pass W wide (one shape for every pass; the host-driven loop sizes its passes instead).
        need = state != done
        shift = ar[None] - (w - seq_len[:, None])
        real = (shift >= 0) & need[:, None]
        ids = torch.where(real, seq.gather(1, shift.clamp(min=0)), 0)
        key_real[:, cur:cur + w] = real
        passes += need.long()
        hidden = run(embed(ids), cur)
        cur += w
    # The one copy to the host.
    out_h, len_h, passes_h, choices_h = (t.tolist() for t in (out, out_len, passes, choices))
    rows = [DecodeResult(out_h[r][:len_h[r]], passes_h[r], choices_h[r]) for r in range(b)]
    return BatchDecodeResult(rows, max(passes_h))


def _host_driven_loop(dg: DeviceGrammar, grammar, run, embed, head, bias, hidden: torch.Tensor,
                      key_real: torch.Tensor, cur: int, cap: int) -> list[DecodeResult]:
    """The decode loop when reading values back is free (CPU), with the bookkeeping on the host: stop when
    all rows are done, make each pass only as wide as needed, and feed at most `cap` tokens of a row per
    pass (its pending tokens are its choice and the forced run after it; a row chooses again only once they
    are all in the cache). Per pass the device does the LLM pass and one gathered-row argmax; the grammar
    steps are list lookups (a tensor op per row and step costs more than the step on a CPU)."""
    device, b = hidden.device, hidden.shape[0]
    runs, ends, done = dg.host_runs, dg.host_ends, dg.done
    states = [dg.start_state] * b
    out = [list(dg.start_run) for _ in range(b)]
    passes, choices = [1] * b, [0] * b
    pend: list[list[int]] = [[] for _ in range(b)]
    off = [0] * b
    ready = [True] * b
    weight = head.weight
    while True:
        choose = [r for r in range(b) if ready[r] and states[r] != done]
        if choose:
            h = hidden if len(choose) == b else hidden.index_select(0, torch.tensor(choose, device=device))
            allowed = dg.allowed.index_select(0, torch.tensor([states[r] for r in choose], device=device))
            tokens = constrained_argmax(h.to(weight.dtype), weight, allowed, bias=bias, validate=False).tolist()
            for r, token in zip(choose, tokens):
                entered = grammar.advance(states[r], token)
                seq = [token, *runs[entered]]
                out[r].extend(seq)
                choices[r] += 1
                states[r] = ends[entered]
                pend[r], off[r] = seq, 0
        need = [r for r in range(b) if states[r] != done and off[r] < len(pend[r])]  # a finished row feeds nothing
        if not need:
            break
        take = {r: min(len(pend[r]) - off[r], cap) for r in need}
        width = max(take.values())
        ids = [[0] * width for _ in range(b)]
        real = [[False] * width for _ in range(b)]
        for r, k in take.items():  # right-aligned: the row's last fed token in the last column
            ids[r][width - k:] = pend[r][off[r]:off[r] + k]
            real[r][width - k:] = [True] * k
            off[r] += k
            passes[r] += 1
        key_real[:, cur:cur + width] = torch.tensor(real, device=device)
        hidden = run(embed(torch.tensor(ids, device=device)), cur)
        cur += width
        ready = [r in take and off[r] == len(pend[r]) for r in range(b)]
    return [DecodeResult(out[r], passes[r], choices[r]) for r in range(b)]
