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
`.tolist()`: a CPU test watches every op of it), and `graphs=True`
(`VLAPolicy(cuda_graphs=True)`) captures a whole call, the prefill and every
pass, as one CUDA graph per batch size and prompt-length bucket
(`DecodeGraphs`); off by default until measured on a GPU (none was available
when it was written; `benchmarks/run_gpu.sh` tests and times it). On a CPU, where reading a value back costs nothing,
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

from contextlib import nullcontext
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
                              max_width: int | None = None, lean: bool | None = None,
                              graphs: bool = False) -> BatchDecodeResult:
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

    `graphs`: the whole decode (prefill and every pass) as one captured CUDA graph per batch size and prompt
    length bucket (`DecodeGraphs`), replayed per call; implies `sync_every=0`. On a CPU nothing is captured
    and the same bucketed, fixed-shape decode runs directly (what the CPU tests check).
    """
    device = prompts[0].embeds.device
    if graphs:
        if sync_every or max_width is not None:
            raise ValueError("graphs=True runs the fixed-shape device loop: no sync_every, no max_width")
        return DecodeGraphs.of(core).decode(prompts, grammar, lean)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 0
    adaptive = sync_every == 1  # host reads every step anyway: feed only as wide as this step needs
    if max_width is not None and not adaptive:
        raise ValueError("max_width needs sync_every=1 (the host decides each pass's width)")
    dg = DeviceGrammar.build(grammar, device)
    inputs, start_run = _with_start_run(core, prompts, dg)
    p_cols = inputs.embeds.shape[1]
    cap = dg.width if max_width is None else max(1, min(int(max_width), dg.width))
    length = _cache_length(dg, p_cols, cap)
    key_real = torch.zeros((len(prompts), length), dtype=torch.bool, device=device)
    key_real[:, :p_cols] = inputs.attention_mask.bool()
    prefix = inputs.prefix_len.to(device) if core.layout.prefix_lm else None
    run = _pass(core, key_real, prefix, length, inputs.embeds.dtype, lean, fixed_shapes=False)
    hidden = run(inputs.embeds, 0)
    head = core.llm.get_output_embeddings()
    if adaptive:
        rows = _host_driven_loop(dg, grammar, run, core.llm.get_input_embeddings(), head,
                                 getattr(head, "bias", None), hidden, key_real, p_cols, cap)
        return BatchDecodeResult(rows, max(r.forward_passes for r in rows))
    outs = _device_loop(core, dg, run, hidden, key_real, p_cols, start_run, sync_every)
    # The one copy to the host.
    return _rows(*(t.tolist() for t in outs))


def _with_start_run(core, prompts: list[LLMInputs], dg: DeviceGrammar) -> tuple[LLMInputs, torch.Tensor]:
    """The prompts, each followed by the grammar's forced start run, left-padded into one batch; and the run."""
    embed = core.llm.get_input_embeddings()
    start_run = torch.tensor([dg.start_run], dtype=torch.long, device=prompts[0].embeds.device)
    return LLMInputs.left_padded([p.extended(embed(start_run)) if dg.start_run else p for p in prompts]), start_run


def _cache_length(dg: DeviceGrammar, p_cols: int, cap: int) -> int:
    """Cache columns for a prompt of `p_cols` columns: every pass after the prefill is at most W (or `cap`)
    wide; with a cap, a pass happens at most once per decoded token."""
    return p_cols + (max(0, dg.max_choices - 1) * dg.width if cap == dg.width else dg.max_tokens * cap)


def _pass(core, key_real: torch.Tensor, prefix: torch.Tensor | None, length: int, dtype: torch.dtype,
          lean: bool | None, fixed_shapes: bool):
    """`run(embeds, start) -> (B, H)`: one LLM pass feeding `embeds` at cache columns [start, start + W) over a
    new cache of `length` columns (the lean pass's or a `StaticCache`), masked by `key_real` (which the
    caller updates before each pass), returning each row's last hidden state. `fixed_shapes`: never read a
    value back (the lean pass then always takes a mask), so the pass can be captured."""
    device = key_real.device
    offset = core.layout.position_offset
    if lean is None:
        lean = device.type == "cpu"
    lean_decoder = LeanDecoder.build(core) if lean else None
    b = key_real.shape[0]
    if lean_decoder is not None:
        lean_cache = lean_decoder.new_cache(b, length, dtype, device)
        rotary = lean_decoder.rotary_tables(length + offset, torch.zeros(1, 1, 1, dtype=dtype, device=device))

        def run(embeds: torch.Tensor, start: int) -> torch.Tensor:
            end = start + embeds.shape[1]
            real = key_real[:, :end]  # the columns written so far; later ones are masked anyway
            positions = (real.long().cumsum(1) - 1).clamp(min=0)[:, start:end] + offset
            mask = _allowed(real, start, end - start, prefix)[:, None] if fixed_shapes else \
                _visible(real, start, end - start, prefix)
            return lean_decoder.forward(embeds, positions, mask, start, lean_cache, rotary)
        run.weights = lean_cache.layers  # what a captured graph reads (rebuilt when a weight changes)
        return run
    from transformers import StaticCache

    decoder = core.decoder()
    cache = StaticCache(config=core.llm.config, max_cache_len=length)

    def run(embeds: torch.Tensor, start: int) -> torch.Tensor:
        width = embeds.shape[1]
        positions = (key_real.long().cumsum(1) - 1).clamp(min=0)[:, start:start + width] + offset
        out = decoder(inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True,
                      attention_mask=_mask(key_real, start, width, prefix, dtype),
                      cache_position=torch.arange(start, start + width, device=device))
        return out.last_hidden_state[:, -1]
    run.weights = None
    return run


def _device_loop(core, dg: DeviceGrammar, run, hidden: torch.Tensor, key_real: torch.Tensor, cur: int,
                 start_run: torch.Tensor, sync_every: int) -> tuple[torch.Tensor, ...]:
    """The decode after the prefill with every step on the device: (ids (B, max tokens + 1), lengths,
    passes, choices), all device tensors. Every pass is W wide; with `sync_every` 0 it never reads a value
    back, so a whole call can be captured (`DecodeGraphs`)."""
    device, b, w = hidden.device, hidden.shape[0], dg.width
    embed = core.llm.get_input_embeddings()
    head = core.llm.get_output_embeddings()
    bias = getattr(head, "bias", None)
    state = torch.full((b,), dg.start_state, dtype=torch.long, device=device)
    max_tokens = dg.max_tokens
    out = torch.zeros((b, max_tokens + 1), dtype=torch.long, device=device)  # the last column takes spills
    out[:, :len(dg.start_run)] = start_run
    out_len = torch.full((b,), len(dg.start_run), dtype=torch.long, device=device)
    done = torch.full((b,), dg.done, dtype=torch.long, device=device)
    passes = torch.ones((b,), dtype=torch.long, device=device)
    choices = torch.zeros((b,), dtype=torch.long, device=device)
    ar = torch.arange(w, device=device)
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
    return out, out_len, passes, choices


def _rows(out_h: list, len_h: list, passes_h: list, choices_h: list) -> BatchDecodeResult:
    rows = [DecodeResult(out_h[r][:len_h[r]], passes_h[r], choices_h[r]) for r in range(len(len_h))]
    return BatchDecodeResult(rows, max(passes_h))


class DecodeGraphs:
    """Whole static decodes captured as CUDA graphs: one per (rows, prompt columns rounded up to `BUCKET`, dtype,
    grammar, LLM pass), kept on the model (at most `CAPACITY`, least recently used dropped).

    A call left-pads its prompts to the bucket (padding attends nowhere and positions count real tokens, so
    a row decodes what it decodes alone), copies them into the entry's input buffers and replays the graph:
    the prefill, every pass of the device loop (`_device_loop`, W wide, `max_choices` iterations, no value
    read back) and the grammar steps, then one copy of the ids to the host. The first call of a key runs the
    decode twice on a side stream (kernels compiled, the cache allocated) and then captures it. A graph
    reads the weights where they were at capture: an entry is rebuilt when a parameter of the LLM moves or,
    for the lean pass, when a weight changes in place (its fused copies are rebuilt).

    On a CPU nothing is captured: the same bucketed, fixed-shape decode runs directly on the entry's buffers
    (the tests check it there against the eager decoder). The capture itself runs only on a GPU
    (`benchmarks/run_gpu.sh`: its equality test and its `static_graphs` timing column).
    """

    BUCKET = 16
    CAPACITY = 8

    def __init__(self, core):
        import threading
        from collections import OrderedDict

        self.core = core
        self.entries: "OrderedDict[tuple, _GraphEntry]" = OrderedDict()
        self.lock = threading.Lock()  # an entry's buffers and outputs serve one call at a time

    @staticmethod
    def unsupported(core) -> str | None:
        """Why this LLM's decode cannot be captured, or None. Dynamic and longrope RoPE read the longest
        position back to the host in every forward (to resize their tables)."""
        cfg = core.llm.config
        cfg = getattr(cfg, "get_text_config", lambda: cfg)()
        rope = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
        if "dynamic" in rope or rope == "longrope":
            return f"its rotary embedding ({rope!r}) reads the positions back in every forward"
        return None

    @staticmethod
    def of(core) -> "DecodeGraphs":
        """The model's graphs (kept on the core module, outside its parameters and state dict)."""
        graphs = core.__dict__.get("_vla_decode_graphs")
        if graphs is None:
            graphs = core.__dict__["_vla_decode_graphs"] = DecodeGraphs(core)
        return graphs

    def decode(self, prompts: list[LLMInputs], grammar, lean: bool | None) -> BatchDecodeResult:
        why = self.unsupported(self.core)
        if why is not None:
            raise ValueError(f"this model's decode cannot be captured as a CUDA graph: {why}")
        device = prompts[0].embeds.device
        with self.lock, (torch.cuda.device(device) if device.type == "cuda" else nullcontext()):
            return self._decode(prompts, grammar, lean, device)

    def _decode(self, prompts: list[LLMInputs], grammar, lean: bool | None, device: torch.device) -> BatchDecodeResult:
        core = self.core
        if lean is None:
            lean = device.type == "cpu"
        dg = DeviceGrammar.build(grammar, device)
        inputs, start_run = _with_start_run(core, prompts, dg)
        p = inputs.embeds.shape[1]
        cols = -(-p // self.BUCKET) * self.BUCKET
        extra = cols - p
        embeds = torch.nn.functional.pad(inputs.embeds, (0, 0, extra, 0))
        mask = torch.nn.functional.pad(inputs.attention_mask, (extra, 0))
        prefix = inputs.prefix_len.to(device) + extra  # the prefix is counted in columns, pads included
        key = (len(prompts), cols, embeds.dtype, str(device), id(grammar), bool(lean))
        params = tuple(t.data_ptr() for t in (*core.llm.parameters(), *core.llm.buffers()))
        entry = self.entries.get(key)
        if entry is None or not entry.valid(grammar, params):
            # The weights moved or changed: every entry that reads the old ones goes (their memory first).
            for k in [k for k, e in self.entries.items() if k == key or not e.valid(e.grammar, params)]:
                del self.entries[k]
            entry = _GraphEntry(core, dg, grammar, start_run, embeds, mask, prefix, lean, params)
            self.entries[key] = entry
            while len(self.entries) > self.CAPACITY:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return _rows(*(t.tolist() for t in entry.replay(embeds, mask, prefix)))


class _GraphEntry:
    """One captured decode: its input buffers, the body's state (cache, mask columns) and its outputs."""

    def __init__(self, core, dg: DeviceGrammar, grammar, start_run: torch.Tensor, embeds: torch.Tensor,
                 mask: torch.Tensor, prefix: torch.Tensor, lean: bool, params: tuple):
        device = embeds.device
        self.grammar, self.params = grammar, params
        self.embeds, self.mask, self.prefix = embeds.clone(), mask.clone(), prefix.clone()
        b, cols = mask.shape
        length = _cache_length(dg, cols, dg.width)
        self.key_real = torch.zeros((b, length), dtype=torch.bool, device=device)
        self.run = _pass(core, self.key_real, self.prefix if core.layout.prefix_lm else None, length,
                         embeds.dtype, lean, fixed_shapes=True)
        self.lean = LeanDecoder.build(core) if self.run.weights is not None else None

        key_real, run, in_embeds, in_mask = self.key_real, self.run, self.embeds, self.mask

        def body() -> tuple[torch.Tensor, ...]:  # locals only: no cycle through the entry, freed when dropped
            key_real.zero_()
            key_real[:, :cols] = in_mask.bool()
            hidden = run(in_embeds, 0)
            return _device_loop(core, dg, run, hidden, key_real, cols, start_run, 0)

        self.body = body
        self.graph = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # compile the kernels, allocate the cache: never during a capture
                for _ in range(2):
                    body()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = body()

    def valid(self, grammar, params: tuple) -> bool:
        """Still reads the model's weights: no parameter moved and, for the lean pass, no fused copy rebuilt."""
        if grammar is not self.grammar or params != self.params:
            return False
        return self.lean is None or self.lean._weights()[0] is self.run.weights

    def replay(self, embeds: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.embeds.copy_(embeds)
        self.mask.copy_(mask)
        self.prefix.copy_(prefix)
        if self.graph is None:
            return self.body()
        self.graph.replay()
        return self.outputs


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
