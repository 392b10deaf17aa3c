"""A lean forward pass for the static decoder: the LLM's own weights, none of its per-call machinery.

At the sizes a CPU serves (and at batch 1 on any device) a Hugging Face
decoder forward is mostly Python: output records, mask builders, cache
objects, per-module hooks. `LeanDecoder` runs the same arithmetic as the
LLM's decoder for the Llama family (Llama, Mistral without a sliding window,
Qwen2, Gemma) straight from the modules' weights:

- RMSNorm, rotary embeddings, attention and the gated MLP written out as the
  modelling code writes them (same dtypes, same order of operations: fp32
  norms, the rotary tables from the model's own `rotary_emb`);
- its own preallocated KV cache, (B, kv heads, L, head dim) per layer;
  attention reads only the columns written so far (`[:end]`), through the
  static decoder's explicit mask sliced to the same columns (a masked column
  contributes an exact 0 to the softmax, so the slice changes nothing);
- q/k/v and gate/up as one matrix product each (their weights concatenated
  once and cached until a weight changes in place: `Tensor._version`; the
  copies hold about two thirds of the decoder's weights again, which is why
  the policy uses this pass by default only on a CPU, where models are small);
- the last layer computes its query, attention output and MLP for the last
  column only (the KV of every column is still written): the decoder only
  needs the last position's hidden state.

What it returns is the final-normed hidden state of each row's last column,
as `last_hidden_state[:, -1]` of the Hugging Face forward; tests check that
the decoded actions are the same as the eager decoder's. `LeanDecoder.build`
returns None for anything else, and the static decoder then runs the
Hugging Face forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: model types whose decoder layers are written out here (checked again structurally in `build`)
FAMILIES = ("llama", "mistral", "qwen2", "gemma")


def _text_config(cfg):
    return getattr(cfg, "get_text_config", lambda: cfg)()


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    norm2: torch.Tensor
    gu_w: torch.Tensor
    gu_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    act: object


def _cat(*ts):
    if any(t is None for t in ts):
        if all(t is None for t in ts):
            return None
        raise ValueError("some projections have a bias and some do not")
    return torch.cat(ts, 0)


class LeanDecoder:
    """The decoder's arithmetic over its own weights; see the module docstring."""

    def __init__(self, decoder, config):
        cfg = _text_config(config)
        self.decoder = decoder
        self.gemma = cfg.model_type == "gemma"
        first = decoder.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.scaling = first.scaling
        self.eps = getattr(decoder.norm, "variance_epsilon", getattr(decoder.norm, "eps", None))
        self.hidden = cfg.hidden_size
        self._key = None
        self._built: tuple[list[_Layer], torch.Tensor] | None = None  # per-layer weights, final norm

    @staticmethod
    def build(core) -> "LeanDecoder | None":
        """The lean decoder for `core`'s LLM (cached on the decoder module), or None when its family or
        structure is not one written out here."""
        decoder = core.decoder()
        cached = decoder.__dict__.get("_vla_lean")
        if cached is not None:
            return cached if cached is not False else None
        lean = LeanDecoder(decoder, core.llm.config) if LeanDecoder.supports(core) else False
        decoder.__dict__["_vla_lean"] = lean
        return lean or None

    @staticmethod
    def supports(core) -> bool:
        cfg = _text_config(core.llm.config)
        if getattr(cfg, "model_type", None) not in FAMILIES:
            return False
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None):
            return False
        if getattr(cfg, "rope_scaling", None) and cfg.rope_scaling.get("rope_type", "default") == "longrope":
            return False  # its tables depend on the sequence length, not only the position
        decoder = core.decoder()
        need = ("layers", "norm", "rotary_emb", "embed_tokens")
        if not all(hasattr(decoder, n) for n in need):
            return False
        for layer in decoder.layers:
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if a is None or m is None or not all(hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                           "scaling", "head_dim")):
                return False
            if not all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return False
            if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm")):
                return False
            if hasattr(a, "q_norm") or hasattr(a, "k_norm"):
                return False  # Qwen3-style per-head norms: not written out here
        return True

    # -- weights -----------------------------------------------------------
    def _weights(self) -> tuple[list[_Layer], torch.Tensor]:
        """Per-layer weights, q/k/v and gate/up concatenated; rebuilt when any weight changed (an optimizer
        step updates in place and bumps `_version`) or moved."""
        # Listed on every call: a replaced Parameter object (`load_state_dict(assign=True)`) is a change too.
        params = [p for layer in self.decoder.layers for p in layer.parameters()] + list(self.decoder.norm.parameters())
        key = tuple((id(p), p.data_ptr(), p._version, p.dtype) for p in params)
        if key != self._key:
            layers = []
            for layer in self.decoder.layers:
                a, m = layer.self_attn, layer.mlp
                layers.append(_Layer(
                    self._norm_weight(layer.input_layernorm.weight),
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0),
                    _cat(a.q_proj.bias, a.k_proj.bias, a.v_proj.bias),
                    a.o_proj.weight, a.o_proj.bias,
                    self._norm_weight(layer.post_attention_layernorm.weight),
                    torch.cat([m.gate_proj.weight, m.up_proj.weight], 0),
                    _cat(m.gate_proj.bias, m.up_proj.bias),
                    m.down_proj.weight, m.down_proj.bias, _functional(m.act_fn)))
            self._built, self._key = (layers, self._norm_weight(self.decoder.norm.weight)), key
        return self._built

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The family's RMSNorm. `weight` as `_weights` keeps it: Gemma's already 1 + w in fp32."""
        if x.dtype == torch.float32:  # one fused op; in fp32 it is bit-for-bit the written-out form (tested)
            return F.rms_norm(x, x.shape[-1:], weight, self.eps)
        if self.gemma:  # (x * (1 + w)) in fp32, then cast
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * weight).type_as(x)
        xf = x.to(torch.float32)
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def _norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        return 1.0 + w.float() if self.gemma else w

    # -- the pass ------------------------------------------------------------
    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> "LeanCache":
        """A KV cache for one decode call; it also holds the weights as they are now (checked once per call:
        the weights must not change during the call)."""
        n = len(self.decoder.layers)
        shape = (batch, self.kv_heads, length, self.head_dim)
        return LeanCache([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
                         [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)], *self._weights())

    def rotary_tables(self, positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """cos, signed sin for positions 0..positions-1, (positions, head dim), from the model's own rotary
        module (each entry is inv_freq * position, then cos/sin: the same numbers it computes per pass), and
        half the head dim. The modelling code's `x * cos + rotate_half(x) * sin` with rotate_half(x) =
        (-x2, x1) is `x * cos + roll(x, half) * (-sin1, sin2)` element for element (a sign moved between two
        factors of one product; the roll swaps the halves), in two ops fewer; a roll is also 2-7x cheaper
        than gathering the swapped halves by index at the decoder's sizes."""
        ids = torch.arange(positions, device=like.device)[None]
        cos, sin = self.decoder.rotary_emb(like[:1, :1], ids)
        half = self.head_dim // 2
        signed = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)
        return cos[0], signed, half

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, start: int,
                cache: "LeanCache", rotary: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Feed `embeds` (B, W, H) at cache columns [start, start + W) with `positions` (B, W) and `mask`
        (B or 1, 1, W, start + W; boolean, True: attend, or additive) over the columns written so far, None
        when every query sees every column; `rotary` from `rotary_tables`. Returns the final-normed hidden
        state of the last column, (B, H)."""
        b, w, _ = embeds.shape
        end = start + w
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        h = embeds
        if self.gemma:
            h = h * torch.tensor(self.hidden ** 0.5, dtype=h.dtype)
        cos, sin, half = rotary[0][positions][:, :, None], rotary[1][positions][:, :, None], rotary[2]  # (B, W, 1, hd)
        layers = cache.layers
        last = len(layers) - 1
        q_n, kv_n = nh * hd, nkv * hd
        for i, lw in enumerate(layers):
            y = self._norm(h, lw.norm1)
            qkv = F.linear(y, lw.qkv_w, lw.qkv_b)
            qk = qkv[..., :q_n + kv_n].view(b, w, nh + nkv, hd)
            qk = qk * cos + qk.roll(half, -1) * sin  # rotary on every query and key head at once
            cache.k[i][:, :, start:end] = qk[:, :, nh:].transpose(1, 2)
            cache.v[i][:, :, start:end] = qkv[..., q_n + kv_n:].view(b, w, nkv, hd).transpose(1, 2)
            if i == last:  # only the last column's output is needed
                h, qk = h[:, -1:], qk[:, -1:]
                mask_i = None if mask is None else mask[:, :, -1:]
            else:
                mask_i = mask
            rows = qk.shape[1]
            o = F.scaled_dot_product_attention(qk[:, :, :nh].transpose(1, 2), cache.k[i][:, :, :end],
                                               cache.v[i][:, :, :end], attn_mask=mask_i, scale=self.scaling,
                                               enable_gqa=nh != nkv)
            h = h + F.linear(o.transpose(1, 2).reshape(b, rows, q_n), lw.o_w, lw.o_b)
            y = self._norm(h, lw.norm2)
            gu = F.linear(y, lw.gu_w, lw.gu_b)
            inter = gu.shape[-1] // 2
            h = h + F.linear(lw.act(gu[..., :inter]) * gu[..., inter:], lw.down_w, lw.down_b)
        return self._norm(h[:, -1], cache.final_norm)


@dataclass
class LeanCache:
    k: list[torch.Tensor]  # per layer (B, kv heads, L, head dim)
    v: list[torch.Tensor]
    layers: list[_Layer]  # the weights this call runs with
    final_norm: torch.Tensor


def _functional(act):
    """The activation module as the function it computes (a module call costs more than a tiny op)."""
    from torch import nn

    name = type(act).__name__
    if isinstance(act, nn.SiLU) or name == "SiLUActivation":
        return F.silu
    if name in ("PytorchGELUTanh", "GELUTanh") or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    return act
