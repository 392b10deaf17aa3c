"""`vla-scale plan`: per-rank memory of a config under ZeRO-3, from architecture configs alone.

What a user relies on: the parameter counts are those of the model training would build (checked
against real tiny models and against the published sizes of the 7B and 3B models); the model-state
bytes agree with DeepSpeed's own estimator; the frozen encoder never appears in optimizer state;
every preset loads; the command prints a table or JSON and exits 0, or one line and 2.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_scale.cli import main
from vla_scale.config import load_config
from vla_scale.models.loading import build_vla
from vla_scale.train.plan import (build_meta_model, count_parameters, layer_activation_bytes, plan_memory,
                                  resolve_arch, stack_activation_bytes, TransformerShape)

from conftest import REPO, TINY_PRESET

CONFIGS = REPO / "configs"
OPENVLA = CONFIGS / "openvla_plus_7b.yaml"
PI0 = CONFIGS / "pi0_plus_3b.yaml"
QWEN = CONFIGS / "qwen25_05b.yaml"
TINY_PAIRED = CONFIGS / "tiny_paired.yaml"
# Presets whose weights folders are placeholders: they must plan from their architecture JSONs.
GPU_PRESETS = [OPENVLA, PI0, QWEN]


@pytest.fixture(scope="module")
def openvla_plan():
    return plan_memory(load_config(OPENVLA), gpus=8, config_path=OPENVLA)


def test_openvla_plus_7b_parameter_counts(openvla_plan):
    c = openvla_plan.counts
    # Llama-2-7B is 6,738,415,616 parameters at 32000 tokens; 3 added tokens round the vocabulary up to
    # 32064, 64 new rows in the (untied) input and output embeddings.
    assert c.vocab == 32064
    assert c.llm == 6_738_415_616 + 2 * 64 * 4096
    assert c.projector == 2176 * 8704 + 8704 + 8704 * 4096 + 4096 + 4096 * 4096 + 4096
    assert c.projector_widths == [2176, 8704, 4096, 4096]
    assert set(c.frozen_encoders) == {"siglip"} and set(c.trainable_encoders) == {"dinov2"}
    # SigLIP SO400M/14 (428.2M) and DINOv2 ViT-L/14 + 4 registers (304.4M), as the VLA holds them:
    # features come from the second-to-last layer, so the last layer (15.2M / 12.6M) and SigLIP's
    # attention-pooling head are trimmed away (vla_scale.models.vision.trim_to_features).
    assert c.frozen_encoders["siglip"] == 397_200_544
    assert c.trainable_encoders["dinov2"] == 291_772_416
    assert c.image_tokens == 256
    assert c.largest_layer == 32064 * 4096 and c.largest_layer_name.endswith("embed_tokens")


def test_frozen_encoder_is_not_in_optimizer_state(openvla_plan):
    p, c = openvla_plan, openvla_plan.counts
    assert c.trainable == c.llm + c.projector + c.trainable_encoders["dinov2"]
    assert p.optimizer_state_bytes == pytest.approx(12 * c.trainable / 8)
    # Gradients are accumulated in fp32 by default (deepspeed.grad_accum_dtype): 4 B, 18 B in all.
    assert p.model_state_bytes == pytest.approx(18 * c.trainable / 8)
    assert p.grads_bytes == pytest.approx(4 * c.trainable / 8)
    bf16_accum = plan_memory(load_config(OPENVLA, ["deepspeed.grad_accum_dtype=bf16"]), gpus=8,
                             config_path=OPENVLA)
    assert bf16_accum.model_state_bytes == pytest.approx(16 * c.trainable / 8)
    # Replicated in bf16 on every rank: 2 bytes per parameter, not divided by the world size.
    assert p.frozen_bytes == 2 * c.frozen
    assert p.frozen_inside_bytes == pytest.approx(2 * c.frozen / 8)
    assert p.frozen_allgather_bytes_per_forward == pytest.approx(2 * c.frozen * 7 / 8)


def test_model_states_agree_with_deepspeeds_estimator(openvla_plan):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    c = openvla_plan.counts
    _, gpu_mem, largest_mem = estimate_zero3_model_states_mem_needs(
        total_params=c.trainable, largest_layer_params=c.largest_layer, num_gpus_per_node=8, num_nodes=1,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    assert openvla_plan.deepspeed_estimate_bytes == gpu_mem
    # DeepSpeed budgets 18 B/param/world plus 4 B x the largest layer; ours is 18 B with fp32 gradient accumulation.
    assert gpu_mem - largest_mem == pytest.approx(openvla_plan.model_state_bytes, abs=16)


def test_world_size_divides_model_states_but_not_the_frozen_encoder(openvla_plan):
    two_nodes = plan_memory(load_config(OPENVLA), gpus=8, nodes=2, config_path=OPENVLA)
    assert two_nodes.world == 16
    assert two_nodes.model_state_bytes == pytest.approx(openvla_plan.model_state_bytes / 2)
    assert two_nodes.frozen_bytes == openvla_plan.frozen_bytes
    assert two_nodes.llm_act_bytes == openvla_plan.llm_act_bytes  # per-rank micro-batch is unchanged
    assert openvla_plan.fits and openvla_plan.min_gpus is not None and openvla_plan.min_gpus <= 8


def test_host_memory_at_start_is_one_fp32_copy_per_node_0_instead_of_one_per_rank(openvla_plan):
    c, p = openvla_plan.counts, openvla_plan
    assert p.host_build_bytes == 4 * (c.trainable + c.frozen)
    assert p.host_bytes_per_node_every_rank == 8 * p.host_bytes_per_node_rank0 == 8 * p.host_build_bytes
    assert 220 < p.host_bytes_per_node_every_rank / 2**30 < 230  # the "~240 GB per 8-GPU node"
    table = p.format_table()
    assert "Host memory at start, per node" in table and "rank 0 builds it (default)" in table
    d = p.to_dict()
    assert d["host_bytes_per_node_rank0"] == p.host_build_bytes


def test_pi0_plus_3b_siamese_counts():
    plan = plan_memory(load_config(PI0), gpus=8, config_path=PI0)
    c = plan.counts
    assert c.frozen_encoders["siglip_frozen"] == c.trainable_encoders["siglip_train"]  # two copies of one tower
    assert c.frozen_encoders["siglip_frozen"] == pytest.approx(0.412e9, rel=0.01)  # SO400M without its head
    assert c.projector == 2 * 1152 * 2048 + 2048  # PaliGemma's Linear(1152, 2048) over two encoders
    # Gemma-2B with tied embeddings (counted once), vocabulary 257216 + 2 prompt tokens -> 257280.
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 16384 + 2 * 2048
    assert c.llm == 257280 * 2048 + 18 * per_layer + 2048
    assert plan.model_state_bytes == pytest.approx(18 * c.trainable / 8)


def test_activation_formulas():
    # Korthikanti et al.: sbh(34 + 5as/h) bytes per layer in 16-bit; checkpointing keeps 2sbh per layer.
    s, b, h, a = 512, 4, 1024, 16
    assert layer_activation_bytes(s, b, h, a, scores=True) == s * b * h * (34 + 5 * a * s / h)
    assert layer_activation_bytes(s, b, h, a, scores=False) == 34 * s * b * h
    # A gated MLP of width I keeps gate, up, activation and product: 2 + 8I/h, plus 4 for fp32 norm inputs.
    assert layer_activation_bytes(s, b, h, a, scores=False, gated_intermediate=2 * h) == (21 + 16) * s * b * h
    shape = TransformerShape(layers=10, hidden=h, heads=a, tokens_per_sample=s)
    full = stack_activation_bytes(shape, s, b, checkpointing=False, scores=False)
    ckpt = stack_activation_bytes(shape, s, b, checkpointing=True, scores=False)
    assert full == 10 * 34 * s * b * h and ckpt == 10 * 2 * s * b * h + 34 * s * b * h


def _saved_activation_bytes_per_layer(make, run) -> float:
    """Bytes autograd keeps for backward (parameters excluded), per layer: (3 layers - 1 layer) / 2."""
    import torch

    totals = []
    for layers in (1, 3):
        torch.manual_seed(0)
        model = make(layers).to(torch.bfloat16)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(model)
        totals.append(sum(saved.values()))
    return (totals[1] - totals[0]) / 2


def test_activation_formulas_match_what_autograd_keeps():
    """The per-layer estimates stay honest: within -10%/+15% of the bytes real HF layers save for backward."""
    import torch
    from transformers import (Dinov2Config, Dinov2Model, GemmaConfig, GemmaForCausalLM, LlamaConfig,
                              LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel)

    h, s, b, a = 256, 64, 2, 4
    x = torch.randn(b, s, h, dtype=torch.bfloat16, requires_grad=True)
    px = torch.randn(b, 3, 112, 112, dtype=torch.bfloat16)  # 8 x 8 patches of 14 px
    cases = [
        (lambda n: LlamaForCausalLM(LlamaConfig(hidden_size=h, intermediate_size=688, num_hidden_layers=n,
                                                num_attention_heads=a, num_key_value_heads=a, vocab_size=64,
                                                attn_implementation="sdpa")),
         lambda m: m.model(inputs_embeds=x), s, 688),
        (lambda n: GemmaForCausalLM(GemmaConfig(hidden_size=h, intermediate_size=8 * h, num_hidden_layers=n,
                                                num_attention_heads=a, num_key_value_heads=1, head_dim=64,
                                                vocab_size=64, attn_implementation="sdpa")),
         lambda m: m.model(inputs_embeds=x), s, 8 * h),
        (lambda n: Dinov2Model(Dinov2Config(hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                                            image_size=112, patch_size=14, attn_implementation="sdpa")),
         lambda m: m(pixel_values=px), 65, None),  # 64 patches + CLS
        (lambda n: SiglipVisionModel(SiglipVisionConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n,
                                                        num_attention_heads=a, image_size=112, patch_size=14,
                                                        attn_implementation="sdpa")),
         lambda m: m(pixel_values=px), 64, None),
    ]
    for make, run, tokens, gated in cases:
        measured = _saved_activation_bytes_per_layer(make, run)
        formula = layer_activation_bytes(tokens, b, h, a, scores=False, gated_intermediate=gated)
        assert 0.9 <= measured / formula <= 1.15, (make(1).__class__.__name__, measured / formula)


def test_gradient_checkpointing_shrinks_the_peak(openvla_plan):
    off = plan_memory(load_config(OPENVLA, ["model.gradient_checkpointing=false"]), gpus=8, config_path=OPENVLA)
    assert off.activation_bytes > openvla_plan.activation_bytes
    assert off.llm_act_bytes == openvla_plan.llm_act_bytes  # both variants are always reported


@pytest.mark.parametrize("preset", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    for key, value in [("model.llm_arch", cfg.model.llm_arch)] + [
            (f"model.encoders.{i}.arch", e.arch) for i, e in enumerate(cfg.model.encoders)]:
        if value:
            assert resolve_arch(value, key, preset.parent).is_file()


@pytest.mark.parametrize("preset", GPU_PRESETS, ids=lambda p: p.name)
def test_gpu_presets_plan_from_architecture_files_and_fit_what_they_claim(preset):
    cfg = load_config(preset)
    assert not Path(cfg.model.llm or cfg.model.source).exists()  # placeholders a user fills in
    gpus = 1 if cfg.train.strategy == "single" else 8
    plan = plan_memory(cfg, gpus=gpus, config_path=preset)
    assert plan.fits, plan.format_table()
    # The batch divides on the comment's GPU count (tests/test_batching.py: also on 64 GPUs).
    assert plan.batch_error is None
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size * plan.grad_accumulation * gpus


def _build_tiny(cfg):
    vla, _ = build_vla(cfg.model)
    return vla


@pytest.mark.parametrize("layout", ["llava_siamese", "paligemma_siamese", "parts_paired"])
def test_meta_model_counts_equal_the_real_model(layout, tiny_llava, tiny_paligemma, tiny_parts):
    """The meta-device build is what `build_vla` builds: both hand their parts to `assemble_vla`, so every
    parameter has the same name and shape, and the counts agree."""
    if layout == "llava_siamese":
        cfg = load_config(TINY_PRESET, [f"model.source={tiny_llava}"])
    elif layout == "paligemma_siamese":
        cfg = load_config(TINY_PRESET, [f"model.source={tiny_paligemma}", "model.source_type=paligemma"])
    else:
        cfg = load_config(TINY_PAIRED, [f"model.llm={tiny_parts['llm']}",
                                        f"model.encoders.0.path={tiny_parts['dinov2']}",
                                        f"model.encoders.1.path={tiny_parts['siglip']}"])
    real = _build_tiny(cfg)
    meta = build_meta_model(cfg.model)
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(meta.vla) == shapes(real)
    assert all(p.is_meta for p in meta.vla.parameters())  # no weights were read or allocated
    counts = count_parameters(meta)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert counts.frozen_encoders == {n: numel(e) for n, e in real.frozen.encoders.items()}
    assert counts.trainable_encoders == {n: numel(e) for n, e in real.core.encoders.items()}
    assert counts.projector == numel(real.core.projector)
    assert counts.llm == numel(real.core.llm)
    assert counts.trainable == real.trainable_parameter_count()
    assert counts.frozen == real.frozen_parameter_count()
    assert counts.image_tokens == real.num_image_tokens


def test_plan_command_prints_a_table(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "vla_scale.cli", "plan", str(OPENVLA), "--gpus", "8"],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("model states", "frozen encoders", "activations: LLM, checkpointing", "PEAK", "FITS",
                   "estimate_zero3_model_states_mem_needs", "GiB"):
        assert needle in out, needle


def test_plan_json_parses(capsys):
    assert main(["plan", str(PI0), "--gpus", "4", "--nodes", "2", "--gpu-memory", "40", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["world"] == 8 and data["gpu_memory_bytes"] == 40 * 2 ** 30
    assert data["model_state_bytes"] == pytest.approx(18 * data["counts"]["trainable"] / 8)
    assert isinstance(data["fits"], bool) and data["peak_bytes"] > data["model_state_bytes"]


def test_missing_weights_without_arch_is_one_line(capsys):
    assert main(["plan", str(OPENVLA), "model.llm_arch=null", "--gpus", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.llm_arch" in err[0] and "Traceback" not in err[0]


def test_plan_explains_itself(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", "--help"])
    assert e.value.code == 0
    assert "--gpus" in capsys.readouterr().out
