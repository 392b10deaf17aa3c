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
is causal over the cache, as the answer was in training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vla_scale.kernels import MAX_ALLOWED, constrained_argmax
from vla_scale.models.vla import LLMInputs


@dataclass
class DecodeResult:
    ids: list[int]  # decoded ids, EOS included
    forward_passes: int  # LLM forward passes, prefill included
    choices: int  # positions where a token was chosen (not forced)
    choice_logits: list[torch.Tensor] | None = None  # (V,) at each choice, when asked for (tests, debugging)


@torch.no_grad()
def constrained_greedy(core, prompt: LLMInputs, grammar, max_tokens: int = 4096, keep_logits: bool = False) -> DecodeResult:
    """Decode one sequence (batch 1) after `prompt` (`LLMInputs` from `core.embed`) under `grammar`.

    `keep_logits`: also return the full logits at every choice (costs a V-wide product each).
    """
    from transformers import DynamicCache

    decoder = core.decoder()
    embed = core.llm.get_input_embeddings()
    head = core.llm.get_output_embeddings()
    cache = DynamicCache()
    state = grammar.start
    out: list[int] = []
    pending: list[int] = []
    forwards = choices = 0
    hidden = None
    past = 0
    kept: list[torch.Tensor] | None = [] if keep_logits else None
    device = prompt.embeds.device
    # One (1, K) row of allowed ids per grammar state, built once on the device (padded with -1).
    rows = grammar.allowed_table().to(device)
    # The Triton kernel takes up to MAX_ALLOWED ids per row; wider grammars (the 256-bin baseline)
    # use the gathered-row PyTorch path, which still never forms V-wide logits.
    backend = "torch" if rows.shape[1] > MAX_ALLOWED else None
    while not grammar.is_done(state):
        forced = grammar.forced(state)
        if forced is not None:
            out.append(forced)
            pending.append(forced)
            state = grammar.advance(state, forced)
            continue
        # A real choice: bring the LLM up to date with everything appended since its last pass.
        if pending or hidden is None:
            new = embed(torch.tensor([pending], device=device)) if pending else None
            if hidden is None:  # prefill: the prompt, then any forced tokens, in one pass
                inputs = prompt if new is None else prompt.extended(new)
                kwargs = core.llm_kwargs(inputs)
            else:
                kwargs = core.llm_kwargs(LLMInputs(new, torch.ones(new.shape[:2], dtype=torch.long, device=device), None,
                                                     prompt.prefix_len), past=past)
            step = kwargs["inputs_embeds"].shape[1]
            hidden = decoder(**kwargs, past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            past += step
            forwards += 1
            pending = []
        if kept is not None:
            kept.append(core.head_logits(hidden)[0].float())
        # The grammar's ids are valid by construction: skip the per-call input validation.
        token = int(constrained_argmax(hidden.to(head.weight.dtype), head.weight, rows[state:state + 1],
                                       bias=getattr(head, "bias", None), validate=False, backend=backend)[0])
        choices += 1
        out.append(token)
        pending.append(token)
        state = grammar.advance(state, token)
        if len(out) > max_tokens:
            raise RuntimeError(f"action grammar did not terminate within {max_tokens} tokens")
    return DecodeResult(out, forwards, choices, kept)


@torch.no_grad()
def decode_action(model, pixels: torch.Tensor, prompt_ids: list[int], grammar, keep_logits: bool = False) -> DecodeResult:
    """The policy's whole decode for one observation: image tokens of `pixels` (1, C, H, W), the prompt
    `prompt_ids` (BOS first) placed by the model's layout, then constrained greedy decoding.

    The one home of this sequence: `VLAPolicy` and the trainer's validation both call it, so what
    validation reports is what the policy does.
    """
    core = model.core
    ids = torch.tensor([prompt_ids], device=pixels.device)
    return constrained_greedy(core, core.embed(ids, torch.ones_like(ids), model.image_tokens(pixels)), grammar,
                              keep_logits=keep_logits)
