"""Export and the policy: same outputs as in training, and every decoded action is well formed."""
import numpy as np
import pytest
import torch

from vla_scale.actions import ActionNormalizer
from vla_scale.config import config_to_dict, load_config
from vla_scale.errors import CheckpointError
from vla_scale.models.export import load_export, save_export
from vla_scale.models.loading import build_vla
from vla_scale.models.vla import IGNORE_INDEX
from vla_scale.policy import VLAPolicy
from vla_scale.policy.decoding import constrained_greedy

STATS = {"q01": [-0.05, -0.05, -0.04, -0.03, -0.05, -0.05, 0.0], "q99": [0.05, 0.05, 0.03, 0.03, 0.05, 0.05, 1.0],
         "mask": [True] * 6 + [False]}


ENCODERS = {"llava": "model.encoders=[{name: frozen}, {name: trained, trainable: true}]",
            "paligemma": "model.encoders=[{name: frozen, feature_layer: -1, post_layernorm: true}, "
                         "{name: trained, trainable: true, feature_layer: -1, post_layernorm: true}]"}


def _export(source, out, *overrides, family="llava"):
    cfg = load_config(None, [f"model.source={source}", "model.image_size=32", ENCODERS[family], *overrides])
    torch.manual_seed(0)
    vla, tok = build_vla(cfg.model)
    with torch.no_grad():  # random weights: the policy must cope with anything
        for p in vla.core.llm.parameters():
            p.normal_(0, 0.5)
    save_export(vla, tok, STATS, config_to_dict(cfg)["actions"], out)
    return vla, tok, cfg


def test_export_reloads_to_identical_outputs(tiny_llava, tmp_path):
    vla, tok, _ = _export(tiny_llava, tmp_path / "export")
    loaded, tok2, stats, config = load_export(tmp_path / "export")
    assert stats == STATS and config["frozen_encoders"] == ["frozen"]
    assert tok2.convert_tokens_to_ids("<VLA_PROMPT>") == tok.convert_tokens_to_ids("<VLA_PROMPT>")
    ids = torch.tensor([[tok.bos_token_id, 10, 11, 12, tok.eos_token_id]])
    batch = {"pixel_values": torch.rand(1, 3, 32, 32), "input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.tensor([[-100, -100, 11, 12, tok.eos_token_id]])}
    vla.eval()
    with torch.no_grad():
        assert torch.equal(vla(batch).loss, loaded(batch).loss)
        assert torch.equal(vla.image_tokens(batch["pixel_values"]), loaded.image_tokens(batch["pixel_values"]))


@pytest.mark.parametrize("style, chunk", [("fixed", 1), ("vla-plus", 1), ("fixed", 2)])
def test_random_model_always_predicts_well_formed_actions(tiny_llava, tmp_path, style, chunk):
    _export(tiny_llava, tmp_path / "export", f"actions.style={style}", f"actions.chunk={chunk}")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    rng = np.random.default_rng(0)
    words = ["pick", "up", "the", "red", "block", "open", "drawer", "zebra", "?", "42"]
    lo, hi = np.array(STATS["q01"]), np.array(STATS["q99"])
    for i in range(50 if (style, chunk) == ("fixed", 1) else 10):
        size = int(rng.integers(16, 80))
        image = rng.integers(0, 256, size=(size, size + 3, 3), dtype=np.uint8)
        instruction = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
        action = policy.predict_action(image, instruction)
        assert action.shape == ((7,) if chunk == 1 else (chunk, 7))
        assert np.all(np.isfinite(action))
        flat = action.reshape(-1, 7)
        assert np.all(flat[:, :6] >= lo[:6] - 1e-6) and np.all(flat[:, :6] <= hi[:6] + 1e-6)
        assert np.all((flat[:, 6] == 0) | (flat[:, 6] == 1) | ((flat[:, 6] >= -1) & (flat[:, 6] <= 1)))


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_forced_tokens_cost_no_forward_pass_and_choices_match_the_full_model(family, request, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", "actions.style=fixed", "actions.decimals=3", family=family)
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    assert policy.model.core.layout.name == family  # recorded in the export, restored by the policy
    image = np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    policy.predict_action(image, "pick up the red block")
    res = policy.last_decode
    g = policy.grammar
    # Count positions with a real choice by walking the grammar over the decoded ids.
    state, choices = g.start, 0
    for t in res.ids:
        choices += g.forced(state) is None
        state = g.advance(state, t)
    assert g.is_done(state) and res.choices == choices
    assert res.forward_passes == choices  # prefill + one pass per later choice; forced tokens ride along
    assert res.forward_passes < len(res.ids)

    # The full (uncached) model over prompt + decoded answer, the answer labelled as in training
    # (so that for PaliGemma only the image and prompt form the bidirectional prefix).
    model, core = policy.model, policy.model.core
    pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)  # uint8, as the policy feeds it
    prompt = policy.prompts.prompt_ids(policy.prompts.robot_prompt("pick up the red block"))
    with torch.no_grad():
        img = model.image_tokens(pixels)
        ids = torch.tensor([prompt + res.ids])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + res.ids])
        logits = core.llm(**core.llm_kwargs(core.embed(ids, torch.ones_like(ids), img, labels))).logits[0]
        prompt_t = torch.tensor([prompt])
        cached = constrained_greedy(core, core.embed(prompt_t, torch.ones_like(prompt_t), img), g, keep_logits=True)
    assert cached.ids == res.ids
    # Text position t sits at t + P in both layouts (t >= 1); the logits for t come from t - 1.
    offset = len(prompt) + model.num_image_tokens - 1
    state, k_choice = g.start, 0
    for k, t in enumerate(res.ids):
        allowed = g.allowed(state)
        if len(allowed) > 1:
            # The KV-cached decoder (prefill with the layout's attention, then causal steps)
            # computes the full model's logits at every choice, the first one included.
            # fp32 over two kernel paths (one masked pass vs. cached steps): equal to 1e-5 of the
            # logits' scale (these random weights give logits of about 15).
            full = logits[offset + k].float()
            diff = (cached.choice_logits[k_choice] - full).abs().max().item()
            assert diff <= 1e-5 * max(1.0, full.abs().max().item()), (k_choice, diff)
            row = logits[offset + k, allowed]
            assert allowed[int(torch.argmax(row))] == t
            k_choice += 1
        state = g.advance(state, t)
    assert k_choice == len(cached.choice_logits) == res.choices


class _ForcedPrefix:
    """A grammar that forces `prefix` ids before `inner`'s: the prefill then carries answer tokens."""

    def __init__(self, inner, prefix):
        self.inner, self.prefix, self.start = inner, list(prefix), 0
        self.k = len(self.prefix)

    def forced(self, s):
        return self.prefix[s] if s < self.k else self.inner.forced(s - self.k - self.inner.start)

    def allowed(self, s):
        return [self.prefix[s]] if s < self.k else self.inner.allowed(s - self.k - self.inner.start)

    def advance(self, s, t):
        return s + 1 if s < self.k - 1 else (self.k + self.inner.start if s == self.k - 1 else
                                              self.k + self.inner.advance(s - self.k, t))

    def is_done(self, s):
        return s >= self.k and self.inner.is_done(s - self.k)

    def allowed_table(self):
        inner = self.inner.allowed_table()
        head = torch.full((self.k, inner.shape[1]), -1, dtype=inner.dtype)
        head[:, 0] = torch.tensor(self.prefix)
        return torch.cat([head, inner])


def test_paligemma_prefill_with_forced_answer_tokens_matches_the_full_model(tiny_paligemma, tmp_path):
    """Forced tokens before the first choice ride in the prefill: causal, outside the bidirectional prefix."""
    _export(tiny_paligemma, tmp_path / "export", family="paligemma")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    model, core, tok = policy.model, policy.model.core, policy.tokenizer
    assert policy.grammar.start == 0
    forced = tok.encode(" the answer", add_special_tokens=False)
    g = _ForcedPrefix(policy.grammar, forced)
    pixels = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(3, 32, 32), dtype=np.uint8))[None]
    prompt = policy.prompts.prompt_ids(policy.prompts.robot_prompt("open the drawer"))
    with torch.no_grad():
        img = model.image_tokens(pixels)
        prompt_t = torch.tensor([prompt])
        res = constrained_greedy(core, core.embed(prompt_t, torch.ones_like(prompt_t), img), g, keep_logits=True)
        ids = torch.tensor([prompt + res.ids])
        labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + res.ids])
        logits = core.llm(**core.llm_kwargs(core.embed(ids, torch.ones_like(ids), img, labels))).logits[0]
    assert res.ids[:len(forced)] == forced
    first = logits[len(prompt) + model.num_image_tokens - 1 + len(forced)].float()
    diff = (res.choice_logits[0] - first).abs().max().item()
    assert diff <= 1e-5 * max(1.0, first.abs().max().item()), diff


def test_normalizer_round_trip_through_the_policy_stats():
    n = ActionNormalizer.from_stats(STATS)
    a = np.array([0.01, -0.02, 0.0, 0.03, -0.05, 0.05, 1.0])
    np.testing.assert_allclose(n.unnormalize(n.normalize(a)), a, atol=1e-7)


def test_missing_or_corrupt_export_is_a_checkpoint_error(tiny_llava, tmp_path):
    with pytest.raises(CheckpointError, match="not a vla-scale export"):
        VLAPolicy.from_pretrained(tmp_path / "nothing")
    _export(tiny_llava, tmp_path / "export")
    (tmp_path / "export" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VLAPolicy.from_pretrained(tmp_path / "export")


def test_export_never_overwrites_without_force(tiny_llava, tmp_path):
    _export(tiny_llava, tmp_path / "export")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        _export(tiny_llava, tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == before


def test_bin_tokenizer_policy_predicts_well_formed_actions(tiny_llava, tmp_path):
    """The OpenVLA-style baseline decodes through the same policy (256 allowed ids per position)."""
    _export(tiny_llava, tmp_path / "export", "actions.tokenizer=bins")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    image = np.random.default_rng(3).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    action = policy.predict_action(image, "pick up the red block")
    assert action.shape == (7,) and np.all(np.isfinite(action))
    assert len(policy.last_decode.ids) == 8  # 7 bins + EOS
    assert policy.last_decode.forward_passes == 7  # EOS is forced


@pytest.mark.parametrize("augment", [True, False])
def test_policy_preprocesses_images_as_training_did(tiny_llava, tmp_path, augment):
    from PIL import Image

    from vla_scale.data.augment import center_crop, inference_preprocessing
    from vla_scale.data.images import to_pixels

    cfg = load_config(None, [f"model.source={tiny_llava}", "model.image_size=32",
                             "model.encoders=[{name: frozen}, {name: trained, trainable: true}]",
                             f"data.augment={str(augment).lower()}"])
    vla, tok = build_vla(cfg.model)
    save_export(vla, tok, STATS, config_to_dict(cfg)["actions"], tmp_path / "export",
                image_preprocessing=inference_preprocessing(cfg.data.augment))
    _, _, _, config = load_export(tmp_path / "export")
    assert config["image_preprocessing"] == {"center_crop_scale": 0.9 if augment else None}
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    image = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    plain = to_pixels(image, 32)
    cropped = to_pixels(center_crop(Image.fromarray(image), 0.9), 32)
    assert not torch.equal(plain, cropped)
    assert torch.equal(policy.pixels(image), cropped if augment else plain)
