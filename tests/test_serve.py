"""The policy server on loopback: remote actions are the in-process ones, concurrent clients are batched,
bad requests are refused by field while everyone else keeps being served, and a killed client is harmless."""
import os
import re
import subprocess
import sys
import threading

import msgpack
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from vla_scale.cli import main
from vla_scale.errors import DataError, PolicyServerError
from vla_scale.policy import RemotePolicy, VLAPolicy
from vla_scale.policy.server import PolicyServer, ServeLimits
from vla_scale.policy.wire import packb, unpackb

from test_policy import _export
from test_policy_batched import _observations


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The server's decode thread shares torch's intra-op pool: one thread, as in test_policy_static."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def export(tiny_llava, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "export"
    _export(tiny_llava, out)
    return out


@pytest.fixture(scope="module")
def local(export):
    return VLAPolicy.from_pretrained(export, device="cpu")


def _serve(export, **kwargs) -> PolicyServer:
    return PolicyServer(VLAPolicy.from_pretrained(export, device="cpu"), **kwargs).start()


def _raw(server, **kwargs):
    """A bare websocket client (no RemotePolicy), after the server's metadata message."""
    ws = connect(server.url, compression=None, proxy=None, max_size=None, **kwargs)
    meta = unpackb(ws.recv(10))
    assert meta["type"] == "metadata" and meta["server"] == "vla-scale"
    return ws


def _ask(ws, payload) -> dict:
    ws.send(payload if isinstance(payload, (bytes, str)) else packb(payload))
    return unpackb(ws.recv(60))


def test_remote_actions_equal_in_process_actions(export, local):
    images, instructions = _observations(5, seed=11)
    server = _serve(export)
    try:
        with RemotePolicy(server.url) as remote:
            assert remote.metadata["action_dim"] == 7 and remote.metadata["chunk"] == 1
            for image, text in zip(images, instructions):
                got = remote.predict_action(image, text)
                want = local.predict_action(image, text)
                assert got.dtype == np.float32 and got.shape == (7,)
                np.testing.assert_array_equal(got, want)
                assert remote.last_forward_passes == [local.last_decode.forward_passes]
            batch = remote.predict_actions(images, instructions)
            np.testing.assert_array_equal(batch, local.predict_actions(images, instructions))
            assert len({row.tobytes() for row in batch}) > 1
            with pytest.raises(DataError, match="3 images but 2 instructions"):  # checked before sending
                remote.predict_actions(images[:3], instructions[:2])
    finally:
        server.stop()


def test_eight_concurrent_clients_are_all_served_in_one_batched_decode(export, local):
    images, instructions = _observations(8, seed=5)
    # Wait (up to 60 s) for the batch to fill: with 8 clients the decode starts when the 8th request
    # arrives, so the test does not depend on timing.
    server = _serve(export, max_batch=8, batch_wait_ms=60_000)
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def client(i):
        try:
            with RemotePolicy(server.url) as remote:
                barrier.wait(30)
                results[i] = remote.predict_action(images[i], instructions[i])
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stats = server.stats()
    finally:
        server.stop()
    assert not errors, errors
    for i in range(8):
        np.testing.assert_array_equal(results[i], local.predict_action(images[i], instructions[i]))
    assert stats["requests_served"] == 8 and stats["rows"] == 8
    assert stats["histogram"] == {"8": 1} and stats["max_batch_rows"] == 8  # one decode for all eight


def test_bad_requests_are_refused_naming_the_field_and_the_server_keeps_serving(export, local):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    good = {"method": "predict_action", "image": image, "instruction": "pick up the red block"}
    limits = ServeLimits(max_message_bytes=1 << 20, max_image_side=512, max_instruction_chars=200, max_rows=4)
    server = _serve(export, limits=limits)
    bystander = RemotePolicy(server.url)
    want = local.predict_action(image, "pick up the red block")
    try:
        np.testing.assert_array_equal(bystander.predict_action(image, "pick up the red block"), want)
        ws = _raw(server)
        full = packb({**good, "id": 1})
        cases = [
            (full[:len(full) // 2], "message", "not a complete msgpack message"),  # truncated
            ("hello", "message", "binary message"),  # a text frame
            (msgpack.packb([1, 2]), "message", "expected a map"),
            ({**good, "image": image.astype(np.float32)}, "image", "expected a uint8 image"),
            ({**good, "image": image[..., 0]}, "image", r"shape \(H, W, 3\)"),
            ({**good, "image": image.tolist()}, "image", "numpy array"),
            ({**good, "image": np.zeros((600, 8, 3), np.uint8)}, "image", "each side must be 1 to 512"),
            ({**good, "image": np.zeros((0, 8, 3), np.uint8)}, "image", "each side must be 1 to 512"),
            ({**good, "instruction": "   "}, "instruction", "empty"),
            ({**good, "instruction": "x" * 201}, "instruction", "201 characters"),
            ({**good, "instruction": 7}, "instruction", "expected a string"),
            ({**good, "id": float("nan")}, "id", "NaN"),
            ({"method": "predict_actions", "images": [image, image.astype(np.float64) * np.nan],
              "instructions": ["a", "b"]}, "images[1]", "NaN"),
            ({"method": "predict_actions", "images": [image] * 2, "instructions": ["a"]}, "instructions",
             "2 images but 1 instructions"),
            ({"method": "predict_actions", "images": [image] * 5, "instructions": ["a"] * 5}, "images",
             "at most 4"),
            ({"method": "predict_actions", "images": [image, image[:, :, :2]], "instructions": ["a", "b"]},
             "images[1]", "shape"),
            ({**good, "states": [[0.0]]}, "states", "unknown field"),  # predict_action takes one "state"
            ({**good, "state": "up"}, "state", "1-D array of numbers"),
            ({**good, "state": np.zeros((2, 3))}, "state", "1-D state"),
            ({**good, "state": [0.0, float("inf")]}, "state[1]", "NaN or infinity"),
            ({**good, "image": {"primary": image[..., 0]}}, "image.primary", r"shape \(H, W, 3\)"),
            ({**good, "image": {}}, "image", "no camera images"),
            ({"method": "predict_actions", "images": [image] * 2, "instructions": ["a"] * 2, "states": [[0.0]]},
             "states", "2 images but 1 states"),
            ({"method": "predict_action", "image": image}, "instruction", "missing"),
            ({**good, "method": "exec"}, "method", "expected one of"),
        ]
        for payload, field, message in cases:
            reply = _ask(ws, payload)
            assert "error" in reply, (field, reply)
            assert reply["error"]["field"] == field and reply["error"]["type"] == "DataError", reply
            assert re.search(message, reply["error"]["message"]), (message, reply)
        # The same connection, and everyone else, is still served.
        reply = _ask(ws, {**good, "id": 9})
        assert reply["id"] == 9 and np.array_equal(reply["action"], want)
        # The client raises our DataError with the server's message.
        with pytest.raises(DataError, match=r"images\[0\]: expected a uint8 image"):
            bystander.predict_actions([image.astype(np.float32)], ["a"])
        # Oversized: the connection is closed unread (1009), the server goes on.
        huge = np.zeros((2048, 2048, 3), np.uint8)
        with pytest.raises(ConnectionClosed) as closed:
            _ask(ws, {**good, "image": huge})
        assert closed.value.rcvd.code == 1009
        with pytest.raises(DataError, match="takes at most 1048576"):  # RemotePolicy refuses before sending
            bystander.predict_action(huge, "pick")
        np.testing.assert_array_equal(bystander.predict_action(image, "pick up the red block"), want)
        assert server.stats()["requests_refused"] >= len(cases)
    finally:
        bystander.close()
        server.stop()


def test_a_token_is_required_when_set(export):
    server = _serve(export, token="s3cret")
    image = np.zeros((16, 16, 3), np.uint8)
    try:
        with pytest.raises(PolicyServerError, match="HTTP 401"):
            RemotePolicy(server.url).predict_action(image, "pick")
        with pytest.raises(PolicyServerError, match="HTTP 401"):
            RemotePolicy(server.url, token="wrong").predict_action(image, "pick")
        with RemotePolicy(server.url, token="s3cret") as remote:
            assert remote.predict_action(image, "pick").shape == (7,)
    finally:
        server.stop()
    assert server.host == "127.0.0.1"  # loopback unless told otherwise


CLIENT = r"""
import sys, numpy as np
from websockets.sync.client import connect
from vla_scale.policy.wire import packb
ws = connect(sys.argv[1], compression=None, proxy=None)
ws.recv(10)
ws.send(packb({"id": 1, "method": "predict_action", "image": np.zeros((32, 32, 3), np.uint8), "instruction": "go"}))
print("sent", flush=True)
sys.stdin.read()  # until killed
"""


def test_a_client_killed_mid_request_does_not_stop_the_server(export, local):
    # The decode waits (up to 30 s) for a second request, so the kill lands while the request is queued.
    server = _serve(export, max_batch=2, batch_wait_ms=30_000)
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.url], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout.readline().strip() == "sent"
        finally:
            proc.kill()
            proc.wait(30)
        # The next client completes the batch of two; only its own row is answered.
        with RemotePolicy(server.url) as remote:
            np.testing.assert_array_equal(remote.predict_action(image, "pick up"), local.predict_action(image, "pick up"))
            assert remote.predict_actions([image] * 2, ["pick up"] * 2).shape == (2, 7)  # a full batch: no wait
        stats = server.stats()
        assert stats["requests_served"] >= 2
    finally:
        server.stop()


def test_the_cli_serves_and_eval_runs_through_it(export, tmp_path, capsys):
    """`vla-scale serve` in its own process, `vla-scale eval --policy ws://...` against it, stopped by PID."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vla_scale.cli", "serve", str(export), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"on ws://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        # The eval command in this process (its own subprocess would only add start-up time).
        assert main(["eval", "--policy", f"ws://127.0.0.1:{port}", "--task", "push", "--episodes", "1",
                     "--max-steps", "3", "--gifs", "0", "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
        assert "success" in capsys.readouterr().out and (tmp_path / "ev" / "report.json").is_file()
        with RemotePolicy(f"ws://127.0.0.1:{port}") as remote:
            assert remote.stats()["rows"] >= 3  # the evaluation's observations were decoded by the server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 0
