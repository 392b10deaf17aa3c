"""A model trained on two cameras and the robot state gets both cameras and the state where it is used:
the evaluation runner (from the simulator's own observations) and the policy server (RemotePolicy)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vla_scale.config import config_to_dict, load_config
from vla_scale.errors import ConfigError, DataError
from vla_scale.eval.mujoco_backend import MujocoBackend
from vla_scale.eval.runner import ModelPolicy, run_episodes
from vla_scale.models.export import save_export
from vla_scale.models.loading import build_vla
from vla_scale.policy import RemotePolicy, VLAPolicy
from vla_scale.policy.server import PolicyServer

from test_policy import ENCODERS, STATS

CAMERAS = ["primary", "wrist"]
# The MuJoCo tabletop's state: end-effector position (3), quaternion (4), gripper opening (1).
STATE_STATS = {"q01": [-0.3, -0.3, 0.0, -1.0, -1.0, -1.0, -1.0, 0.0], "q99": [0.3, 0.3, 0.35, 1.0, 1.0, 1.0, 1.0, 1.0]}


@pytest.fixture(scope="module")
def export(tiny_llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("inputs") / "export"
    cfg = load_config(None, [f"model.source={tiny_llava}", "model.image_size=32", ENCODERS["llava"]])
    torch.manual_seed(0)
    vla, tok = build_vla(cfg.model)
    with torch.no_grad():  # random weights, large enough that the images and the state change the actions
        for p in vla.core.llm.parameters():
            p.normal_(0, 0.5)
    save_export(vla, tok, {**STATS, "state": STATE_STATS}, config_to_dict(cfg)["actions"], out,
                inputs={"cameras": CAMERAS, "state": "text", "state_bins": 256})
    return out


@pytest.fixture(scope="module")
def local(export):
    return VLAPolicy.from_pretrained(export, device="cpu")


class _Recording:
    """The policy, with every predict_actions call's arguments kept."""

    def __init__(self, policy):
        self.policy, self.calls = policy, []
        self.cameras, self.state_mode = policy.cameras, policy.state_mode

    def predict_actions(self, images, instructions, states=None):
        self.calls.append((images, instructions, states))
        return self.policy.predict_actions(images, instructions, states)


def test_the_runner_gives_the_model_every_camera_and_the_state_it_was_trained_on(local):
    plan = MujocoBackend.plan("in_distribution", ["pick_place"], 2, seed=3)[:2]
    spy = _Recording(local)
    results = run_episodes("mujoco", [replace(e, max_steps=2) for e in plan],
                           ModelPolicy(spy), envs=2, backend_kwargs={"cameras": tuple(CAMERAS)})
    assert [r.steps for r in results] == [2, 2]
    images, instructions, states = spy.calls[0]  # both episodes' resets, in one batched call
    assert len(images) == len(states) == 2
    # The first call sees each episode's reset observation: the same simulator, reset alone, shows the same.
    sim = MujocoBackend(cameras=tuple(CAMERAS))
    try:
        for row, episode in enumerate(plan):
            obs = sim.reset(episode.task, episode.seed)
            assert sorted(images[row]) == CAMERAS
            for cam in CAMERAS:
                np.testing.assert_array_equal(images[row][cam], obs.images[cam])
            np.testing.assert_array_equal(states[row], obs.state)
            assert instructions[row] == obs.instruction
    finally:
        sim.close()
    assert not np.array_equal(images[0]["primary"], images[0]["wrist"])
    # Rendering only the primary camera is named as the problem, with the flag that fixes it.
    sim = MujocoBackend(cameras=("primary",))
    try:
        primary_only = sim.reset("pick_place", 0)
    finally:
        sim.close()
    with pytest.raises(ConfigError, match=r"\['wrist'\] are not rendered.*--cameras primary,wrist"):
        ModelPolicy(local).act([primary_only], plan[:1], [0])


def test_served_model_of_two_cameras_and_state_gives_the_in_process_actions(export, local):
    rng = np.random.default_rng(4)
    obs = [({c: rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for c in CAMERAS},
            rng.uniform(-0.3, 0.3, 8), f"pick up the {colour} block") for colour in ("red", "blue", "green")]
    server = PolicyServer(VLAPolicy.from_pretrained(export, device="cpu")).start()
    try:
        with RemotePolicy(server.url) as remote:
            assert remote.cameras == CAMERAS and remote.state_mode == "text"
            for images, state, text in obs:
                np.testing.assert_array_equal(remote.predict_action(images, text, state=state),
                                              local.predict_action(images, text, state))
            images, states, texts = zip(*obs)
            batch = remote.predict_actions(images, texts, states)
            np.testing.assert_array_equal(batch, local.predict_actions(images, texts, states))
            # The state matters: another state, another action (so equality above is not vacuous).
            moved = remote.predict_actions(images, texts, [s + 0.2 for s in states])
            assert not np.array_equal(batch, moved)
            # What the model needs and was not sent is refused, naming the field; the server keeps serving.
            with pytest.raises(DataError, match="state: this model reads the robot state"):
                remote.predict_action(images[0], texts[0])
            with pytest.raises(DataError, match=r"images\[1\]: this model sees cameras"):
                remote.predict_actions([images[0], images[1]["primary"]], texts[:2], states[:2])
            with pytest.raises(DataError, match=r"states\[0\]: expected a 1-D state"):
                remote.predict_actions(images[:1], texts[:1], [np.zeros((2, 4))])
            np.testing.assert_array_equal(remote({"images": images[0], "instruction": texts[0], "state": states[0]}),
                                          batch[0])
    finally:
        server.stop()
