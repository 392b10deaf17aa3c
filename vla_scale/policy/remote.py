"""`RemotePolicy`: a policy served by `vla-scale serve`, called like a local `VLAPolicy`.

    policy = RemotePolicy("ws://127.0.0.1:8000", token=None)   # token: or $VLA_SCALE_SERVE_TOKEN
    action = policy.predict_action(image_uint8_hwc, "pick up the red block")
    actions = policy.predict_actions(images, instructions)
    # a model trained on several cameras and the robot state (policy.cameras, policy.state_mode):
    action = policy.predict_action({"primary": image, "wrist": wrist}, "pick up the red block", state=state)

Same calls, same shapes and dtypes, same errors as `VLAPolicy`: a request the
server refuses as malformed raises `DataError` with the server's message
(naming the field); a server that cannot be reached, refuses the token, or
closes the connection raises `PolicyServerError`. The connection is opened
lazily and re-opened once after it was lost. One `RemotePolicy` is one
connection with one request in flight: give each thread or process its own.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Sequence

import numpy as np

from vla_scale.errors import DataError, PolicyServerError
from vla_scale.policy.server import TOKEN_ENV
from vla_scale.policy.wire import WireError, packb, unpackb


class RemotePolicy:
    def __init__(self, url: str, token: str | None = None, timeout: float = 600.0, open_timeout: float = 30.0):
        if not url.startswith(("ws://", "wss://")):
            raise DataError(f"RemotePolicy: {url!r} is not a websocket URL (ws://HOST:PORT)")
        self.url = url
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.timeout, self.open_timeout = timeout, open_timeout
        self.metadata: dict[str, Any] = {}
        self.last_forward_passes: list[int] | None = None  # per row of the last call, as the server reported
        self._ws = None
        self._ids = itertools.count()

    # -- the VLAPolicy interface ----------------------------------------------------
    def predict_action(self, image: Any, instruction: str, state: np.ndarray | None = None) -> np.ndarray:
        """Unnormalised action: (D,), or (T, D) for action chunks. `image`: an image, or {camera: image} for
        a model trained on several cameras; `state`: the raw robot state, for a model that reads it."""
        request = {"method": "predict_action", "image": self._observation(image, "image"), "instruction": instruction}
        if state is not None:
            request["state"] = self._state(state, "state")
        return np.asarray(self._call(request)["action"], dtype=np.float32)

    def predict_actions(self, images: Sequence[Any], instructions: Sequence[str],
                        states: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """Unnormalised actions for a batch: (B, D) or (B, T, D); each row as `predict_action` gives it."""
        if isinstance(instructions, str):
            raise DataError("predict_actions: instructions is one string; pass a list with one instruction per image")
        images, instructions = list(images), list(instructions)
        if len(images) != len(instructions):
            raise DataError(f"predict_actions: {len(images)} images but {len(instructions)} instructions; "
                            "pass one instruction per image")
        if not images:
            raise DataError("predict_actions: no observations given (empty images and instructions)")
        request = {"method": "predict_actions", "instructions": instructions,
                   "images": [self._observation(im, f"images[{i}]") for i, im in enumerate(images)]}
        if states is not None:
            if len(states) != len(images):
                raise DataError(f"predict_actions: {len(images)} images but {len(states)} states")
            request["states"] = [self._state(s, f"states[{i}]") for i, s in enumerate(states)]
        return np.asarray(self._call(request)["actions"], dtype=np.float32)

    def __call__(self, observation: dict[str, Any]) -> np.ndarray:
        """Simulator-style call, as `VLAPolicy.__call__`: {"image" or "images", "instruction", "state"}."""
        image = observation["images"] if "images" in observation else observation["image"]
        return self.predict_action(image, observation["instruction"], observation.get("state"))

    @property
    def cameras(self) -> list[str]:
        """The cameras the served model was trained on, in its prefix order (the server's metadata)."""
        self._connect()
        return list(self.metadata.get("cameras") or ["primary"])

    @property
    def state_mode(self) -> str:
        """How the served model reads the robot state: "none", "text" or "projection"."""
        self._connect()
        return str(self.metadata.get("state") or "none")

    @property
    def unnorm_key(self) -> str | None:
        self._connect()
        return self.metadata.get("unnorm_key")

    def stats(self) -> dict:
        """The server's batching record (decodes, rows per decode)."""
        return self._call({"method": "stats"})

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def __enter__(self) -> "RemotePolicy":
        self._connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------
    @classmethod
    def _observation(cls, image: Any, where: str) -> Any:
        if isinstance(image, dict):
            return {str(name): cls._array(im, f"{where}.{name}") for name, im in image.items()}
        return cls._array(image, where)

    @staticmethod
    def _state(state: Any, where: str) -> np.ndarray:
        state = np.asarray(state)
        if state.dtype.kind not in "iuf":
            raise DataError(f"{where}: expected the robot state as numbers, got {state.dtype}")
        return state  # its own dtype: the server normalises exactly what an in-process call would

    @staticmethod
    def _array(image: Any, where: str) -> np.ndarray:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        image = np.asarray(image)
        if image.dtype.kind not in "biuf":
            raise DataError(f"{where}: expected a uint8 image, got {image.dtype}")
        return image

    def _connect(self):
        if self._ws is not None:
            return self._ws
        from websockets.exceptions import InvalidStatus, WebSocketException
        from websockets.sync.client import connect

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = connect(self.url, additional_headers=headers, compression=None, proxy=None,
                         open_timeout=self.open_timeout, max_size=None)
        except InvalidStatus as err:
            code = err.response.status_code
            hint = " (set token= or $VLA_SCALE_SERVE_TOKEN to the server's --token)" if code == 401 else ""
            raise PolicyServerError(f"{self.url} refused the connection: HTTP {code}{hint}") from None
        except (OSError, TimeoutError, WebSocketException) as err:
            raise PolicyServerError(f"cannot connect to the policy server at {self.url}: {err}") from None
        try:
            self.metadata = unpackb(ws.recv(self.open_timeout))
        except (WireError, TimeoutError, WebSocketException) as err:
            ws.close()
            raise PolicyServerError(f"{self.url} is not a vla-scale policy server (no metadata: {err})") from None
        self._ws = ws
        return ws

    def _call(self, request: dict) -> dict:
        from websockets.exceptions import ConnectionClosed

        request["id"] = next(self._ids)
        payload = packb(request)
        for attempt in (0, 1):
            ws = self._connect()
            limit = self.metadata.get("max_message_bytes")
            if limit is not None and len(payload) > limit:
                raise DataError(f"{request['method']}: the request is {len(payload)} bytes; the server at {self.url} "
                                f"takes at most {limit} (send fewer or smaller images)")
            try:
                ws.send(payload)
                reply = unpackb(ws.recv(self.timeout))
                break
            except ConnectionClosed as err:
                self._ws = None
                if attempt == 1 or err.rcvd is not None and err.rcvd.code == 1009:
                    raise PolicyServerError(f"the policy server at {self.url} closed the connection: {err}") from None
            except TimeoutError:
                self.close()
                raise PolicyServerError(f"no reply from {self.url} within {self.timeout} s") from None
            except WireError as err:
                raise PolicyServerError(f"malformed reply from {self.url}: {err}") from None
        if not isinstance(reply, dict) or reply.get("id") != request["id"]:
            raise PolicyServerError(f"reply from {self.url} does not answer request {request['id']}")
        if "error" in reply:
            error = reply["error"]
            message = f"{request['method']} on {self.url}: {error.get('message')}"
            if error.get("type") == "DataError":
                raise DataError(message)
            raise PolicyServerError(message)
        self.last_forward_passes = reply.get("forward_passes")
        return reply
