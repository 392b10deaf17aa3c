"""Batched inference: `predict_actions` gives every row exactly the action `predict_action` gives it alone."""
import numpy as np
import pytest

from vla_scale.errors import DataError
from vla_scale.policy import VLAPolicy

from test_policy import _export

WORDS = ["pick", "up", "the", "red", "block", "open", "drawer", "zebra", "?", "42", "and", "put", "it", "left"]


def _observations(n: int, seed: int):
    """Images of several sizes and instructions of 1 to 14 words: prompts of different lengths."""
    rng = np.random.default_rng(seed)
    images, instructions = [], []
    for i in range(n):
        size = int(rng.integers(24, 64))
        images.append(rng.integers(0, 256, size=(size, size + i % 3, 3), dtype=np.uint8))
        instructions.append(" ".join(rng.choice(WORDS, size=1 + (5 * i) % 14)))
    return images, instructions


def _assert_batch_equals_single_calls(policy: VLAPolicy, images, instructions):
    singles, decodes = [], []
    for image, instruction in zip(images, instructions):
        singles.append(policy.predict_action(image, instruction))
        decodes.append(policy.last_decode)
    batched = policy.predict_actions(images, instructions)
    lengths = {len(policy.prompts.prompt_ids(policy.prompts.robot_prompt(t))) for t in instructions}
    assert len(lengths) > 1  # the batch really is left-padded
    assert batched.dtype == np.float32 and batched.shape == (len(images), *singles[0].shape)
    np.testing.assert_array_equal(batched, np.stack(singles))
    assert len({a.tobytes() for a in batched}) > 1  # rows differ: no row copied another's decode
    result = policy.last_batch_decode
    for row, alone in zip(result.rows, decodes):
        # Same tokens, same choices, same forced runs riding along in the same passes.
        assert (row.ids, row.choices, row.forward_passes) == (alone.ids, alone.choices, alone.forward_passes)
    assert result.forward_passes == max(d.forward_passes for d in decodes)
    return result


@pytest.mark.parametrize("family, style, chunk", [("llava", "fixed", 1), ("llava", "vla-plus", 1),
                                                  ("llava", "fixed", 2), ("paligemma", "fixed", 1),
                                                  ("paligemma", "vla-plus", 1)])
def test_random_model_batch_gives_each_row_its_single_call_action(family, style, chunk, request, tmp_path):
    source = request.getfixturevalue(f"tiny_{family}")
    _export(source, tmp_path / "export", f"actions.style={style}", f"actions.chunk={chunk}", family=family)
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    images, instructions = _observations(6, seed=7)
    result = _assert_batch_equals_single_calls(policy, images, instructions)
    if style == "vla-plus":  # rows end at different lengths: finished rows keep stepping while others decode
        assert len({len(row.ids) for row in result.rows}) > 1


def test_trained_model_batch_gives_each_row_its_single_call_action(tiny_config, tmp_path):
    from vla_scale.data.synthetic import make_samples
    from vla_scale.train.export import export_checkpoint
    from vla_scale.train.trainer import Trainer

    cfg = tiny_config("train.steps=30", "train.checkpoint_every=30")
    trained = Trainer(cfg).fit(resume="none")
    export = export_checkpoint(trained.last_checkpoint, tmp_path / "export")
    policy = VLAPolicy.from_pretrained(export, device="cpu")
    held_out = make_samples("robot", 4, seed=12345, image_size=cfg.data.synthetic.image_size,
                            action_dim=cfg.actions.dim)
    images, instructions = _observations(4, seed=3)
    _assert_batch_equals_single_calls(policy, [s["image"] for s in held_out] + images,
                                      [s["instruction"] for s in held_out] + instructions)


def test_malformed_batches_are_data_errors_that_say_where(tiny_llava, tmp_path):
    _export(tiny_llava, tmp_path / "export")
    policy = VLAPolicy.from_pretrained(tmp_path / "export", device="cpu")
    images, instructions = _observations(3, seed=1)
    with pytest.raises(DataError, match="3 images but 2 instructions"):
        policy.predict_actions(images, instructions[:2])
    with pytest.raises(DataError, match="instructions is one string"):
        policy.predict_actions(images, "pick up")
    with pytest.raises(DataError, match="no observations"):
        policy.predict_actions([], [])
    gray = [images[0], images[1][..., 0], images[2]]
    with pytest.raises(DataError, match=r"images\[1\]: expected an RGB image of shape \(H, W, 3\)"):
        policy.predict_actions(gray, instructions)
    floats = [images[0], images[1], images[2].astype(np.float32)]
    with pytest.raises(DataError, match=r"images\[2\]: expected a uint8 image"):
        policy.predict_actions(floats, instructions)
