"""Grammar-constrained greedy decoding of action tokens, with a KV cache.

At every position the action grammar says which token ids may come next.
- One allowed id (a forced token: '.', separators, EOS, the zeros after a
  leading 1): it is appended without computing any logits (jump-forward),
  and forced tokens are fed to the LLM together with the next chosen token,
  in one forward pass.
- Several allowed ids: only those rows of the LM head are multiplied with
  the hidden state (`constrained_argmax`: a Triton kernel on CUDA, a gathered-
  row PyTorch reference elsewhere); the V-wide logits are never formed.
So the number of LLM forward passes per action equals the number of
positions with a real choice, and every decoded sequence parses, whatever
the weights are.

The prompt (image included) is fed in one prefill pass with the layout's
attention (bidirectional over the prefix for PaliGemma); every later token
is causal over the cache, as the answer was in training. A batch of
observations decodes together (`constrained_greedy_batch`): prompts are
left-padded, every row keeps its own grammar state, and one sequence is the
batch of one, so the batched and single-observation paths are one code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_scale.kernels import constrained_argmax
from vla_scale.models.vla import LLMInputs


@dataclass
class DecodeResult:
    ids: list[int]  # decoded ids, EOS included
    forward_passes: int  # LLM forward passes this sequence took part in, prefill included
    choices: int  # positions where a token was chosen (not forced)
    choice_logits: list[torch.Tensor] | None = None  # (V,) at each choice, when asked for (tests, debugging)


@dataclass
class BatchDecodeResult:
    rows: list[DecodeResult]  # per sequence, as if it had been decoded alone
    forward_passes: int  # batched LLM forward passes, prefill included (the longest row's count)


@torch.no_grad()
def constrained_greedy(core, prompt: LLMInputs, grammar, max_tokens: int = 4096, keep_logits: bool = False) -> DecodeResult:
    """Decode one sequence after `prompt` (batch-1 `LLMInputs` from `core.embed`): `constrained_greedy_batch`
    with one row."""
    return constrained_greedy_batch(core, [prompt], grammar, max_tokens, keep_logits).rows[0]


@torch.no_grad()
def constrained_greedy_batch(core, prompts: list[LLMInputs], grammar, max_tokens: int = 4096,
                             keep_logits: bool = False) -> BatchDecodeResult:
    """Decode one sequence after each of `prompts` (batch-1 `LLMInputs` from `core.embed`, any lengths) under
    `grammar`, each row in its own grammar state, over one batched KV cache.

    The prompts are left-padded (`LLMInputs.left_padded`) so that all rows end at the same column. At each
    pass every unfinished row feeds the tokens appended since its last pass (its forced run and its last
    choice, as the single-row decoder would), right-aligned and left-padded to the widest row; finished rows
    feed only padding. So each row makes exactly the choices, passes and forced runs it makes alone; only
    fp32 rounding differs between the batched and the single-row pass.

    `keep_logits`: also return the full logits at every choice (costs a V-wide product each).
    """
    from transformers import DynamicCache

    decoder = core.decoder()
    embed = core.llm.get_input_embeddings()
    head = core.llm.get_output_embeddings()
    device = prompts[0].embeds.device
    b = len(prompts)
    cache = DynamicCache()
    cache_mask = None  # (B, columns in the cache): 1 where a row holds a real token
    states = [grammar.start] * b
    out: list[list[int]] = [[] for _ in range(b)]
    pending: list[list[int]] = [[] for _ in range(b)]
    passes, choices = [0] * b, [0] * b
    kept: list[list[torch.Tensor]] | None = [[] for _ in range(b)] if keep_logits else None
    # Each grammar state's allowed ids, built once on the device (padded with -1): row r gathers its state's.
    table = grammar.allowed_table().to(device)
    while True:
        for r in range(b):  # jump-forward: forced tokens are appended without a model step
            while not grammar.is_done(states[r]) and (forced := grammar.forced(states[r])) is not None:
                out[r].append(forced)
                pending[r].append(forced)
                states[r] = grammar.advance(states[r], forced)
        active = [r for r in range(b) if not grammar.is_done(states[r])]
        if not active:
            break
        # A real choice in some row: bring the LLM up to date with everything appended since its last pass.
        if cache_mask is None:  # prefill: each prompt, then its forced tokens, in one pass
            inputs = LLMInputs.left_padded([p.extended(embed(torch.tensor([pending[r]], device=device)))
                                            if pending[r] else p for r, p in enumerate(prompts)])
        else:
            width = max(len(pending[r]) for r in active)
            ids = torch.zeros((b, width), dtype=torch.long)
            mask = torch.zeros((b, width), dtype=torch.long)
            for r in active:
                ids[r, width - len(pending[r]):] = torch.tensor(pending[r])
                mask[r, width - len(pending[r]):] = 1
            inputs = LLMInputs(embed(ids.to(device)), mask.to(device), None, prompts[0].prefix_len)
        kwargs = core.llm_kwargs(inputs, past_mask=cache_mask)
        hidden = decoder(**kwargs, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        cache_mask = inputs.attention_mask if cache_mask is None else torch.cat([cache_mask, inputs.attention_mask], 1)
        for r in active:
            passes[r] += 1
            pending[r] = []
        rows = torch.tensor(active, device=device)
        h = hidden.index_select(0, rows)
        if kept is not None:
            logits = core.head_logits(h).float()
            for i, r in enumerate(active):
                kept[r].append(logits[i])
        allowed = table.index_select(0, torch.tensor([states[r] for r in active], device=device))
        # The grammar's ids are valid by construction: skip the per-call input validation.
        tokens = constrained_argmax(h.to(head.weight.dtype), head.weight, allowed,
                                    bias=getattr(head, "bias", None), validate=False).tolist()
        for r, token in zip(active, tokens):
            choices[r] += 1
            out[r].append(token)
            pending[r].append(token)
            states[r] = grammar.advance(states[r], token)
            if len(out[r]) > max_tokens:
                raise RuntimeError(f"action grammar did not terminate within {max_tokens} tokens")
    rows_out = [DecodeResult(out[r], passes[r], choices[r], None if kept is None else kept[r]) for r in range(b)]
    return BatchDecodeResult(rows_out, max(passes))


@torch.no_grad()
def decode_actions(model, pixels: torch.Tensor, prompt_ids: list[list[int]], grammar,
                   keep_logits: bool = False, state: torch.Tensor | None = None, static: bool = False,
                   max_width: int | None = None, lean: bool | None = None, graphs: bool = False) -> BatchDecodeResult:
    """The policy's whole decode for a batch of observations: image tokens of `pixels` (B, C, H, W), each
    prompt of `prompt_ids` (BOS first, any lengths) placed by the model's layout, then constrained greedy
    decoding of all rows at once. Several cameras: `pixels` (B, C, 3, H, W); `state` (B, S): the normalised
    state for a model with a state projection (one more prefix token, as in training).

    The one home of this sequence: `VLAPolicy` and the trainer's validation both call it (through
    `decode_action` for one observation), so what validation reports is what the policy does.
    `static`: decode over a preallocated cache with the grammar on the device
    (`static_decoding.constrained_greedy_static`: same ids, choices and passes); `lean`: its LLM pass;
    `graphs`: the whole static decode replayed as a captured CUDA graph (see there).
    """
    core = model.core
    images, _ = core.prefix_tokens(pixels, model.frozen(pixels), state=state)
    prompts = []
    for r, row in enumerate(prompt_ids):
        ids = torch.tensor([row], device=pixels.device)
        prompts.append(core.embed(ids, torch.ones_like(ids), images[r:r + 1]))
    if static and not keep_logits:
        from vla_scale.policy.static_decoding import constrained_greedy_static

        if graphs:
            return constrained_greedy_static(core, prompts, grammar, lean=lean, graphs=True)
        return constrained_greedy_static(core, prompts, grammar, max_width=max_width, lean=lean)
    return constrained_greedy_batch(core, prompts, grammar, keep_logits=keep_logits)


@torch.no_grad()
def decode_action(model, pixels: torch.Tensor, prompt_ids: list[int], grammar, keep_logits: bool = False) -> DecodeResult:
    """`decode_actions` for one observation: `pixels` (1, C, H, W), `prompt_ids` one prompt."""
    return decode_actions(model, pixels, [prompt_ids], grammar, keep_logits).rows[0]
