"""Action decoding speed of the product path against Hugging Face `generate` (a script, not a test).

    python benchmarks/decode.py [--out benchmarks/results/decode_<device>.json] [--repeats 10] [--threads 1]
    python benchmarks/decode.py --device cuda --sizes 2048x20 [--sizes 4096x32]   # ~1B, ~7B (GPU)

For each action style and model size, on the same tiny-vocabulary VLA built
locally with random weights (decode speed does not depend on what the weights
say) and the same observations, it times, per batch size B = 1, 8, 32:
- `VLAPolicy.predict_action` (B = 1) / `predict_actions` (B > 1) with the
  eager decoder (dynamic KV cache, grammar on the host) and with the static
  decoder (preallocated KV cache, grammar tables on the device, fixed-width
  passes: `vla_scale.policy.static_decoding`), whole calls: image
  preprocessing, vision encoders, projector, prefill, decode, unnormalising;
- baseline: `llm.generate` on the same left-padded prefix embeddings (greedy,
  KV cache, full-vocabulary head), `max_new_tokens` = `min_new_tokens` = the
  longest action in the batch, plus the same vision encoders and projector.
The baseline's text need not parse; the constrained output always does.
Reported: ms per action (call time / B), actions per second (Hz), LLM passes
per action (prefill included), decoded tokens per action, and the speedup of
each decoder over `generate`. On CUDA it adds the static decoder replayed as
one captured CUDA graph per call (`cuda_graphs=True`) and reports the time per pass
against the weight-bandwidth floor (LLM weight bytes / measured device copy
bandwidth). Prints a table and writes JSON; ratios are what to compare.
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

STYLES = {"fixed": ["actions.style=fixed"], "fixed-d3": ["actions.style=fixed", "actions.decimals=3"],
          "vla-plus": ["actions.style=vla-plus"]}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, repeats: int, device: str, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def build_export(workdir: Path, style: str, llm_hidden: int, llm_layers: int) -> Path:
    from vla_scale.config import config_to_dict, load_config
    from vla_scale.models.export import save_export
    from vla_scale.models.loading import build_vla
    from vla_scale.models.tiny import build_tiny_llava

    src = workdir / f"src-{llm_hidden}x{llm_layers}"
    if not src.exists():
        build_tiny_llava(src, llm_hidden=llm_hidden, llm_layers=llm_layers)
    cfg = load_config(None, [f"model.source={src}", "model.image_size=32", *STYLES[style],
                             "model.encoders=[{name: frozen}, {name: trained, trainable: true}]"])
    vla, tok = build_vla(cfg.model)
    stats = {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    out = workdir / f"export-{style}-{llm_hidden}x{llm_layers}"
    save_export(vla, tok, stats, config_to_dict(cfg)["actions"], out)
    return out


def copy_bandwidth_gbs() -> float:
    """Device copy bandwidth (bytes read + written per second), 2 GiB buffers."""
    x = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 2 * 10 / (time.perf_counter() - t) / 1e9


def other_pass(device: str) -> str:
    """The static decoder's non-default LLM pass on this device, as a column name."""
    return "static_hf" if device == "cpu" else "static_lean"


def run(export: Path, style: str, batch: int, repeats: int, device: str, bandwidth: float | None) -> dict:
    from vla_scale.data.images import to_pixels
    from vla_scale.models.vla import LLMInputs
    from vla_scale.policy import VLAPolicy

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # static: the product's static decoder as the device runs it by default (CPU: the lean LLM pass; CUDA: the
    # Hugging Face forward over a StaticCache); the other LLM pass as "static_hf" (CPU) / "static_lean" (CUDA).
    other = other_pass(device)
    kinds = {"eager": dict(decoder="eager"), "static": dict(decoder="static"),
             other: dict(decoder="static", lean=device != "cpu")}
    if device == "cuda":  # the whole decode replayed as one captured CUDA graph (the first call captures it)
        kinds["static_graphs"] = dict(decoder="static", cuda_graphs=True)
    policies = {name: VLAPolicy.from_pretrained(export, device=device, dtype=dtype, **kw) for name, kw in kinds.items()}
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(batch)]
    words = ["pick up the red block", "open the top drawer", "push the blue cube to the left", "stack the cups"]
    texts = [words[i % len(words)] for i in range(batch)]

    def call(policy):
        return (lambda: policy.predict_action(images[0], texts[0])) if batch == 1 else \
            (lambda: policy.predict_actions(images, texts))

    ref = policies["eager"]
    ref.predict_actions(images, texts)
    rows = ref.last_batch_decode.rows
    n_new = max(len(r.ids) for r in rows)
    model, core = ref.model, ref.model.core

    def baseline():
        with torch.no_grad():
            pixels = torch.stack([to_pixels(im, model.image_size) for im in images]).to(ref.device)
            img = model.image_tokens(pixels)
            prompts = []
            for i, text in enumerate(texts):
                ids = torch.tensor([ref.prompts.prompt_ids(ref.prompts.robot_prompt(text))], device=ref.device)
                prompts.append(core.embed(ids, torch.ones_like(ids), img[i:i + 1]))
            inputs = LLMInputs.left_padded(prompts)
            core.llm.generate(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask,
                              max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, use_cache=True,
                              pad_token_id=ref.tokenizer.pad_token_id)

    failed = {}
    if "static_graphs" in policies:  # untested on a GPU when written: a failure is recorded, not fatal
        try:
            policies["static_graphs"].predict_actions(images, texts)
        except Exception as err:  # noqa: BLE001
            failed["static_graphs_error"] = f"{type(err).__name__}: {err}"[:500]
            del policies["static_graphs"], kinds["static_graphs"]
    times = {name: statistics.median(_timeit(call(p), repeats, device)) for name, p in policies.items()}
    times["generate"] = statistics.median(_timeit(baseline, repeats, device))
    want = ref.predict_actions(images, texts)
    same = {name: bool(np.array_equal(policies[name].predict_actions(images, texts), want)) for name in kinds}
    passes = statistics.mean(r.forward_passes for r in rows)
    llm_bytes = sum(p.numel() * p.element_size() for p in core.llm.parameters())
    row = {"style": style, "params": sum(p.numel() for p in model.parameters()), "batch": batch,
           "tokens_per_action": statistics.mean(len(r.ids) for r in rows), "passes_per_action": passes,
           "batch_passes": ref.last_batch_decode.forward_passes,
           **{f"{name}_equals_eager": same[name] for name in kinds if name != "eager"}, **failed}
    for name, t in times.items():
        row[f"{name}_ms_per_call"] = 1e3 * t
        row[f"{name}_ms_per_action"] = 1e3 * t / batch
        row[f"{name}_hz"] = batch / t
    for name in kinds:
        row[f"{name}_speedup"] = times["generate"] / times[name]
    if bandwidth is not None:  # whole call / passes: an upper bound on the time per pass
        row["llm_weight_bytes"] = llm_bytes
        row["floor_ms_per_pass"] = 1e3 * llm_bytes / (bandwidth * 1e9)
        for name in kinds:
            row[f"{name}_ms_per_pass"] = 1e3 * times[name] / row["batch_passes"]
            row[f"{name}_vs_floor"] = row[f"{name}_ms_per_pass"] / row["floor_ms_per_pass"]
    return row


def text_formats(n: int = 2000) -> list[dict]:
    """Per action style and decimals, on the demo's synthetic robot actions (normalised with their own 1st/99th
    percentiles, gripper kept 0/1): decoded tokens, choice positions (= LLM passes a decode makes for exactly
    this text: forced characters ride along) and the rounding error the text format alone costs (mean
    |round trip - action| in normalised and raw units). No model: the accuracy cost of the format itself."""
    from vla_scale.actions import ActionNormalizer
    from vla_scale.actions.string_tokenizer import StringActionTokenizer
    from vla_scale.data.synthetic import make_samples
    from vla_scale.models.tiny import build_tokenizer

    tok = build_tokenizer()
    raw = np.stack([s["action"] for s in make_samples("robot", n, seed=0)])
    mask = [True] * 6 + [False]
    norm = ActionNormalizer.from_actions(raw, mask)
    normalized = norm.normalize(raw)
    rows = []
    for style in ("fixed", "vla-plus"):
        for decimals in (4, 3, 2):
            at = StringActionTokenizer(tok, 7, decimals=decimals, style=style)
            grammar = at.grammar(tok.eos_token_id)
            tokens, choices, back = [], [], []
            for a in normalized:
                ids = list(at.encode(a)) + [tok.eos_token_id]
                tokens.append(len(ids))
                choices.append(sum(grammar.choice_positions(ids)))
                back.append(at.decode(ids))
            back = np.asarray(back)
            rows.append({"style": style, "decimals": decimals, "tokens_per_action": float(np.mean(tokens)),
                         "passes_per_action": float(np.mean(choices)),
                         "normalized_abs_error": float(np.abs(back - normalized)[:, :6].mean()),
                         "raw_abs_error": float(np.abs(norm.unnormalize(back) - raw)[:, :6].mean()),
                         "raw_action_scale": float(np.abs(raw[:, :6]).mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU intra-op threads (default 1: on a shared 2-core machine two OpenMP threads stall)")
    ap.add_argument("--sizes", action="append", default=None, metavar="HIDDENxLAYERS",
                    help="LLM sizes (default 64x2 and 256x4; add 2048x20 (~1B) or 4096x32 (~7B) on a GPU)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--styles", default=",".join(STYLES))
    ap.add_argument("--formats", action="store_true",
                    help="only the text-format table (tokens, passes, rounding error per style and decimals)")
    args = ap.parse_args()
    if args.formats:
        rows = text_formats()
        for r in rows:
            print(f"{r['style']:8} decimals {r['decimals']}: {r['tokens_per_action']:5.1f} tokens, "
                  f"{r['passes_per_action']:5.1f} passes per action; rounding error {r['normalized_abs_error']:.2e} "
                  f"normalised, {r['raw_abs_error']:.2e} raw (mean |action| {r['raw_action_scale']:.3f})")
        out = Path(args.out or Path(__file__).parent / "results" / "decode_formats.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "decode_formats", "date": datetime.date.today().isoformat(),
                                   "rows": rows}, indent=2))
        print(f"wrote {out}")
        return
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sizes = [tuple(int(v) for v in s.split("x")) for s in (args.sizes or ["64x2", "256x4"])]
    bandwidth = copy_bandwidth_gbs() if args.device == "cuda" else None
    rows = []
    other = other_pass(args.device)
    with tempfile.TemporaryDirectory() as d:
        for hidden, layers in sizes:
            for style in args.styles.split(","):
                export = build_export(Path(d), style, hidden, layers)
                for b in (int(x) for x in args.batches.split(",")):
                    reps = max(3, args.repeats // (1 + b // 8))
                    rows.append(run(export, style, b, reps, args.device, bandwidth))
                    r = rows[-1]
                    print(f"{r['style']:8} {r['params']:>10d} B={b:<3d} tok {r['tokens_per_action']:5.1f} "
                          f"passes {r['passes_per_action']:5.1f} | ms/action eager {r['eager_ms_per_action']:7.2f} "
                          f"static {r['static_ms_per_action']:7.2f} {other} {r[other + '_ms_per_action']:7.2f} "
                          f"generate {r['generate_ms_per_action']:7.2f} | Hz static {r['static_hz']:7.1f} | speedup "
                          f"eager {r['eager_speedup']:5.2f}x static {r['static_speedup']:5.2f}x "
                          f"{other} {r[other + '_speedup']:5.2f}x | same {r['static_equals_eager']} "
                          f"{r[other + '_equals_eager']}"
                          + (f" | graphs {r['static_graphs_ms_per_action']:7.2f} ms/action, "
                             f"{r['static_graphs_speedup']:5.2f}x, same {r['static_graphs_equals_eager']}"
                             if "static_graphs_speedup" in r else "")
                          + (f" | ms/pass static {r['static_ms_per_pass']:.3f} floor {r['floor_ms_per_pass']:.3f}"
                             if bandwidth else ""), flush=True)
    import transformers

    result = {"benchmark": "decode", "date": datetime.date.today().isoformat(), "device": args.device,
              "machine": platform.machine(), "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "copy_bandwidth_gbs": bandwidth, "torch": torch.__version__, "transformers": transformers.__version__,
              "repeats": args.repeats, "rows": rows}
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
