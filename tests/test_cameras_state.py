"""Several cameras and the robot state reach the model: every camera's tokens in the prefix in config
order, an absent camera (or a text-only sample's image) is exactly left out, the state arrives as
pi0.5-style text or through a projection, and the planner counts the cameras."""
import numpy as np
import pytest
import torch
from PIL import Image

from vla_scale.actions.factory import make_action_tokenizer
from vla_scale.config import load_config
from vla_scale.data.images import to_pixels
from vla_scale.data.pipeline import build_data
from vla_scale.data.prompts import PromptBuilder
from vla_scale.data.schema import COLUMNS, camera_image, robot_sample
from vla_scale.data.state import StateNormalizer, discretize, state_text
from vla_scale.data.streaming_compat import import_streaming
from vla_scale.errors import ConfigError, DataError
from vla_scale.models.loading import build_vla, load_tokenizer
from vla_scale.models.vla import IGNORE_INDEX

SIAMESE = "model.encoders=[{name: frozen, trainable: false}, {name: trained, trainable: true}]"
CAMS = ("primary", "wrist", "left")


@pytest.fixture(autouse=True)
def _own_tmpdir(tmp_path, monkeypatch):
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setenv("TMPDIR", str(d))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(d))


def _images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vla_tok(tiny_llava):
    vla, tok = build_vla(load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32"]).model)
    return vla.eval(), tok


def _text(tok, b=1):
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("what is it? a red cup", add_special_tokens=False)] * b)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    return ids, labels


def _loss(vla, pixels, ids, labels, **extra):
    with torch.no_grad():
        out = vla({"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                   "labels": labels, **extra})
    return out.sample_loss_sum


def test_each_camera_adds_its_tokens_in_config_order(vla_tok):
    vla, tok = vla_tok
    a, b = _images(1, seed=1), _images(1, seed=2)
    two = torch.stack([a[0], b[0]])[None]  # (1, 2, 3, H, W)
    tokens = vla.image_tokens(two)
    assert tokens.shape[1] == 2 * vla.num_image_tokens
    # Camera k's block is exactly what that image alone gives, in the order listed.
    torch.testing.assert_close(tokens[:, :vla.num_image_tokens], vla.image_tokens(a), rtol=0, atol=1e-6)
    torch.testing.assert_close(tokens[:, vla.num_image_tokens:], vla.image_tokens(b), rtol=0, atol=1e-6)
    ids, labels = _text(tok)
    swapped = torch.stack([b[0], a[0]])[None]
    assert not torch.allclose(_loss(vla, two, ids, labels), _loss(vla, swapped, ids, labels))


def test_an_absent_camera_is_exactly_left_out(vla_tok):
    vla, tok = vla_tok
    a, b = _images(1, seed=1), _images(1, seed=2)
    ids, labels = _text(tok)
    two = torch.stack([a[0], b[0]])[None]
    alone = _loss(vla, a, ids, labels)
    masked = _loss(vla, two, ids, labels, image_mask=torch.tensor([[True, False]]))
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)


def test_a_sample_without_an_image_is_the_llm_on_its_text_alone(vla_tok):
    vla, tok = vla_tok
    ids, labels = _text(tok)
    masked = _loss(vla, _images(1), ids, labels, image_mask=torch.tensor([[False]]))
    with torch.no_grad():
        logits = vla.core.llm(input_ids=ids).logits[:, :-1]
    targets = labels[:, 1:]
    sel = targets != IGNORE_INDEX
    expect = torch.nn.functional.cross_entropy(logits[sel], targets[sel], reduction="sum")
    torch.testing.assert_close(masked, expect[None], rtol=1e-5, atol=1e-5)


def test_state_projection_is_one_prefix_token_that_a_missing_state_leaves_out(tiny_llava):
    cfg = load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32", "model.state_dim=5",
                             "data.state=projection"])
    vla, tok = build_vla(cfg.model)
    vla.eval()
    plain, _ = build_vla(load_config(None, [f"model.source={tiny_llava}", SIAMESE, "model.image_size=32"]).model)
    ids, labels = _text(tok, 2)
    x = _images(2)
    state = torch.tensor([[0.5, -0.2, 0.1, 0.9, -1.0], [0.0, 0.3, -0.7, 0.2, 0.4]])
    # Zero-initialised: step 0 adds a zero token, nothing else (the projection learns from there).
    assert vla.core.state_projection.weight.abs().sum() == 0
    torch.nn.init.normal_(vla.core.state_projection.weight, std=0.5)
    with_state = _loss(vla, x, ids, labels, state=state, state_mask=torch.tensor([True, True]))
    other = _loss(vla, x, ids, labels, state=-state, state_mask=torch.tensor([True, True]))
    assert (with_state - other).abs().min() > 1e-4  # the state's value reaches the loss
    without = _loss(vla, x, ids, labels, state=state, state_mask=torch.tensor([False, False]))
    torch.testing.assert_close(without, _loss(plain.eval(), x, ids, labels), rtol=1e-5, atol=1e-5)
    opt_params = {id(p) for p in vla.core.parameters() if p.requires_grad}
    assert id(vla.core.state_projection.weight) in opt_params


def test_state_text_is_the_discretised_normalised_state():
    norm = StateNormalizer([0.0, -1.0, 5.0], [1.0, 1.0, 5.0])  # last dimension constant
    x = norm.normalize([0.25, 2.0, 5.0])
    np.testing.assert_allclose(x, [-0.5, 1.0, 0.0])
    assert discretize(np.array([-1.0, -0.5, 0.0, 1.0]), 256).tolist() == [0, 64, 128, 255]
    assert state_text(x, 256) == "64 255 128"


def _write_three_camera_shards(out, n_eps=2, steps=3):
    """Robot rows with primary, wrist (the `wrist_image` column every shard has) and an `image_left`
    column, plus states; written with streaming's own MDSWriter (named cameras' columns)."""
    from vla_scale.data.camera_images import DEFAULT_CODEC, ImageCodec

    streaming = import_streaming()
    rng = np.random.default_rng(0)
    rows = []
    png = ImageCodec("png")
    with streaming.MDSWriter(out=str(out), columns={**COLUMNS, "image_left": "bytes"}, size_limit=1 << 14) as w:
        for ep in range(n_eps):
            for t in range(steps):
                # Smooth, distinct per camera and step (JPEG keeps them within a few levels).
                imgs = {c: np.clip(np.linspace(0, 60, 16)[None, :, None] + rng.integers(40, 190, (1, 1, 3)), 0, 255)
                        .repeat(16, axis=0).astype(np.uint8) for c in CAMS}
                state = np.array([ep, t * 0.5, 1.0 - t], dtype=np.float32)
                row = robot_sample(image=imgs["primary"], cameras={"wrist": imgs["wrist"], "left": imgs["left"]},
                                   instruction="open the drawer", action=np.full(7, 0.01 * t, np.float32),
                                   state=state, dataset="cams", episode=ep, step=t)
                row = {k: (png if k == "image_left" else DEFAULT_CODEC).store(v) if k.startswith(("image", "wrist"))
                       else v for k, v in row.items()}
                w.write(row)
                rows.append((imgs, state))
    return rows


def _cam_config(tiny_config, shards, *extra):
    return tiny_config("data.max_length=200", "train.global_batch_size=4", "train.micro_batch_size=4",
                       f"data.sources=[{{name: robot, task: robot, path: '{shards}', weight: 0.5}}, "
                       "{name: vqa, task: vqa, weight: 0.5}]", "data.synthetic.samples_per_source=8", *extra)


def test_the_pipeline_feeds_every_listed_camera_and_the_state_text(tiny_config, tiny_llava, tmp_path):
    rows = _write_three_camera_shards(tmp_path / "shards")
    cfg = _cam_config(tiny_config, tmp_path / "shards", "data.cameras=[left, primary, wrist]", "data.state=text",
                      "model.image_size=16")
    tok = load_tokenizer(tiny_llava)
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
    loader, stats = build_data(cfg, prompts)
    states = np.stack([s for _, s in rows])
    np.testing.assert_allclose(stats["robot"]["state"]["q01"], np.quantile(states, 0.01, axis=0), atol=0.02)
    proc = loader.processor
    for uid in range(len(rows)):
        out = proc.sample(loader.dataset[uid])
        imgs, state = rows[uid]
        assert out["pixels"].shape == (3, 3, 16, 16) and out["image_mask"] == [True] * 3
        for k, cam in enumerate(("left", "primary", "wrist")):
            # The listed camera's own pixels, in the listed order (the wrist passed through JPEG: close).
            diff = (out["pixels"][k].int() - to_pixels(imgs[cam], 16).int()).abs().max()
            assert diff <= (0 if cam == "left" else 6), (cam, diff)  # left is PNG: exact
        text = state_text(proc.state_normalizers["robot"].normalize(state), 256)
        prompt = prompts.prompt_ids(prompts.robot_prompt("open the drawer", text))
        assert out["input_ids"][:len(prompt)] == prompt
    batch = loader.next_step()[0]
    assert batch["pixel_values"].shape == (4, 3, 3, 16, 16)
    vl = [i for i, s in enumerate(batch["source"].tolist()) if loader.source_names[s] == "vqa"]
    assert vl and all(batch["image_mask"][i].tolist() == [False, True, False] for i in vl)
    # A sample is read the same whatever it is batched with. (A VL sample's absent cameras were once float
    # zeros: stacking them promoted the whole mixed batch to float 0-255, which the encoders read as [0, 1]
    # floats, so the model trained on other inputs than robot-only batches, validation and the policy gave.)
    assert batch["pixel_values"].dtype == torch.uint8
    robot = [i for i in range(4) if i not in vl]
    vla, _ = build_vla(cfg.model)
    vla.eval()
    alone = {k: v[robot] for k, v in batch.items() if torch.is_tensor(v) and v.shape[:1] == (4,)}
    with torch.no_grad():
        mixed_loss = vla(batch).sample_loss_sum[robot]
        alone_loss = vla(alone).sample_loss_sum
    torch.testing.assert_close(mixed_loss, alone_loss, rtol=1e-5, atol=1e-6)


def test_a_robot_source_without_a_listed_camera_or_state_is_an_error(tiny_config, tiny_llava, tmp_path):
    _write_three_camera_shards(tmp_path / "shards")
    tok = load_tokenizer(tiny_llava)
    cfg = _cam_config(tiny_config, tmp_path / "shards", "data.cameras=[primary, top]")
    prompts = PromptBuilder(tok, make_action_tokenizer(cfg.actions, tok), cfg.data.max_length)
    loader, _ = build_data(cfg, prompts)
    with pytest.raises(DataError, match="no camera 'top' .*image_top"):
        loader.processor.sample(loader.dataset[0])
    with pytest.raises(ConfigError, match="model.state_dim"):
        _cam_config(tiny_config, tmp_path / "shards", "data.state=projection")


@pytest.mark.parametrize("mode", ["projection", "text"])
def test_two_cameras_and_state_train_export_and_drive_the_policy(tiny_config, tiny_llava, tmp_path, mode):
    """Train 2 steps, export, and the policy asks for what training fed: both cameras and the state."""
    from vla_scale.policy.policy import VLAPolicy
    from vla_scale.train.export import export_checkpoint
    from vla_scale.train.trainer import Trainer

    rows = _write_three_camera_shards(tmp_path / "shards")
    extra = ["model.state_dim=3"] if mode == "projection" else []
    cfg = _cam_config(tiny_config, tmp_path / "shards", "data.cameras=[primary, left]", f"data.state={mode}",
                      "train.steps=2", "train.checkpoint_every=0", "model.image_size=16", *extra)
    Trainer(cfg).fit()
    export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "export")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    assert policy.cameras == ["primary", "left"] and policy.state_mode == mode
    imgs, state = rows[0]
    action = policy({"images": {"primary": imgs["primary"], "left": imgs["left"]}, "state": state,
                     "instruction": "open the drawer"})
    assert action.shape == (7,) and np.isfinite(action).all()
    with pytest.raises(DataError, match="cameras"):
        policy({"image": imgs["primary"], "state": state, "instruction": "open the drawer"})
    with pytest.raises(DataError, match="state"):
        policy({"images": imgs, "instruction": "open the drawer"})


def test_the_plan_counts_every_camera_and_the_state_token():
    from vla_scale.train.plan import plan_memory
    from conftest import REPO

    path = REPO / "configs" / "openvla_plus_7b.yaml"
    one = plan_memory(load_config(path), gpus=8, config_path=path)
    two = plan_memory(load_config(path, ["data.cameras=[primary, wrist]"]), gpus=8, config_path=path)
    assert two.seq_len - one.seq_len == one.counts.image_tokens == 256
    for name, v in one.encoder_act_bytes.items():
        assert two.encoder_act_bytes[name] == 2 * v
    state = plan_memory(load_config(path, ["data.state=projection", "model.state_dim=8"]), gpus=8, config_path=path)
    assert state.seq_len - one.seq_len == 1


def test_legacy_wrist_column_reads_as_the_wrist_camera():
    img = np.zeros((8, 8, 3), np.uint8)
    img[:, :4] = 200
    row = robot_sample(image=img, wrist_image=img, instruction="x", action=np.zeros(7), dataset="d", episode=0,
                       step=0)
    got = camera_image(row, "wrist")
    assert isinstance(got, Image.Image) and np.abs(np.asarray(got, int) - img).max() < 8
    assert camera_image(row, "left") is None


def test_logged_tokens_count_every_camera_and_the_state_token_the_llm_ran_on(tiny_config, tmp_path):
    """Throughput counts what the LLM decoder attended to: each present camera's patch tokens (a VL sample
    has the primary only) and the state token of samples that have a state, not one image per sample."""
    from test_profiling import CountingTrainer
    from vla_scale.train.metrics import read_metrics

    _write_three_camera_shards(tmp_path / "shards")
    cfg = _cam_config(tiny_config, tmp_path / "shards", "data.cameras=[primary, left]", "data.state=projection",
                      "model.state_dim=3", "model.image_size=16", "train.steps=4", "train.log_every=1",
                      "train.checkpoint_every=0")
    trainer = CountingTrainer(cfg)
    trainer.fit(resume="none")
    assert len(trainer.llm_tokens) == 4  # one micro-batch (one decoder forward) per step
    rows = {r["step"]: r for r in read_metrics(cfg.run.output_dir)}
    for step in (2, 3, 4):  # step 1 is the warm-up: no throughput line
        perf = rows[step]
        assert perf["perf/window_steps"] == 1
        logged = perf["perf/tokens_per_s"] * perf["perf/window_s"]
        assert logged == pytest.approx(trainer.llm_tokens[step - 1], rel=1e-9)
    # One image per sample (the count before) is not what the decoder ran on in these batches.
    assert trainer.llm_tokens != trainer.batch_tokens
