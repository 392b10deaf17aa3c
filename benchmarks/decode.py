"""Action decoding speed: grammar-constrained policy vs Hugging Face `generate` (a script, not a test).

    python benchmarks/decode.py [--out benchmarks/results/decode_<device>.json] [--repeats 20]

Both sides decode one action for the same image and prompt on the same tiny
VLA (built locally, random weights: the speed of decoding does not depend on
what the weights say):
- constrained: `VLAPolicy.predict_action` (grammar-constrained greedy, KV
  cache, forced tokens appended without a forward pass, gathered-row argmax);
- baseline: `llm.generate` on the same prefix embeddings (greedy, KV cache,
  full-vocabulary LM head), `max_new_tokens` = `min_new_tokens` = the
  action's token count, so both emit the same number of tokens.
Both include the vision encoders, the projector and the prefill. The
baseline's text need not parse; the constrained output always does.
Prints a table and writes JSON; the ratio is what to compare across machines.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timeit(fn, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def build_policy(workdir: Path, style: str, llm_hidden: int, llm_layers: int, device: str):
    from vla_scale.config import config_to_dict, load_config
    from vla_scale.models.export import save_export
    from vla_scale.models.loading import build_vla
    from vla_scale.models.tiny import build_tiny_llava
    from vla_scale.policy import VLAPolicy

    src = build_tiny_llava(workdir / "src", llm_hidden=llm_hidden, llm_layers=llm_layers)
    cfg = load_config(None, [f"model.source={src}", "model.image_size=32", f"actions.style={style}",
                             "model.encoders=[{name: frozen}, {name: trained, trainable: true}]"])
    vla, tok = build_vla(cfg.model)
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    save_export(vla, tok, stats, config_to_dict(cfg)["actions"], workdir / f"export-{style}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return VLAPolicy.from_pretrained(workdir / f"export-{style}", device=device, dtype=dtype)


def run(style: str, llm_hidden: int, llm_layers: int, repeats: int, device: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        policy = build_policy(Path(d), style, llm_hidden, llm_layers, device)
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    instruction = "pick up the red block"
    policy.predict_action(image, instruction)
    n_tokens = len(policy.last_decode.ids)
    passes = policy.last_decode.forward_passes

    model, core = policy.model, policy.model.core
    from vla_scale.data.images import to_pixels

    def baseline():
        with torch.no_grad():
            pixels = to_pixels(image, model.image_size).unsqueeze(0).to(policy.device)
            ids = torch.tensor([policy.prompts.prompt_ids(policy.prompts.robot_prompt(instruction))],
                               device=policy.device)
            inputs = core.embed(ids, torch.ones_like(ids), model.image_tokens(pixels))
            core.llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, max_new_tokens=n_tokens,
                              min_new_tokens=n_tokens, do_sample=False, use_cache=True,
                              pad_token_id=policy.tokenizer.pad_token_id)

    t_con = _timeit(lambda: policy.predict_action(image, instruction), repeats)
    t_gen = _timeit(baseline, repeats)
    n_params = sum(p.numel() for p in model.parameters())
    con, gen = statistics.median(t_con), statistics.median(t_gen)
    return {"style": style, "llm_hidden": llm_hidden, "llm_layers": llm_layers, "params": n_params,
            "action_tokens": n_tokens, "constrained_forward_passes": passes,
            "constrained_ms": 1e3 * con, "generate_ms": 1e3 * gen, "speedup": gen / con,
            "constrained_ms_all": [1e3 * t for t in t_con], "generate_ms_all": [1e3 * t for t in t_gen]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    sizes = [(64, 2), (256, 4)] + ([(2048, 20)] if args.device == "cuda" else [])  # ~1B LLM on GPU
    for style in ("fixed", "vla-plus"):
        for hidden, layers in sizes:
            rows.append(run(style, hidden, layers, args.repeats, args.device))
    print(f"{'style':9} {'params':>9} {'tokens':>6} {'passes':>6} {'constrained ms':>15} {'generate ms':>12} {'speedup':>8}")
    for r in rows:
        print(f"{r['style']:9} {r['params']:9d} {r['action_tokens']:6d} {r['constrained_forward_passes']:6d} "
              f"{r['constrained_ms']:15.2f} {r['generate_ms']:12.2f} {r['speedup']:7.2f}x")
    result = {"benchmark": "decode", "date": datetime.date.today().isoformat(), "device": args.device,
              "machine": platform.machine(), "cpu_count": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    import transformers

    result["transformers"] = transformers.__version__
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
