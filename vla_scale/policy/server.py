"""`vla-scale serve`: one policy on a websocket, shared by many robots or simulators.

    server = PolicyServer(VLAPolicy.from_pretrained("export"), port=8000).start()   # a thread
    ... RemotePolicy("ws://127.0.0.1:8000").predict_action(image, "pick up the block")
    server.stop()

The wire is openpi's: websockets carrying msgpack with numpy arrays
(`vla_scale.policy.wire`). On connect the server sends its metadata; then
each request (one map) gets exactly one reply (one map) on the same
connection, in order:

    {"id": 7, "method": "predict_actions", "images": [uint8 (H, W, 3), ...], "instructions": [str, ...]}
    -> {"id": 7, "actions": float32 (B, D) or (B, T, D), "forward_passes": [...], "batch_rows": n}
    {"id": 8, "method": "predict_action", "image": uint8 (H, W, 3), "instruction": str}
    -> {"id": 8, "action": float32 (D,) or (T, D), ...}
    A model trained on several cameras takes each image as {camera: uint8 (H, W, 3)}, and one that reads
    the robot state takes "state": float (S,) (predict_action) or "states": [float (S,), ...]; the
    metadata names both ("cameras", "state"), and a request without them is refused naming the field.
    {"method": "metadata"} / {"method": "stats"}
    a bad request -> {"id": ..., "error": {"type": "DataError", "field": "images[1]", "message": "..."}}

Batching: requests from all connections go into one queue; one batcher takes
whatever is queued (up to `max_batch` observations, waiting up to
`batch_wait_ms` for more) and runs ONE `VLAPolicy.predict_actions` on it,
which gives every row exactly the action it gets alone. While a decode runs,
new requests queue up and form the next batch. The rows of every decode are
recorded (`batch_sizes`, `stats`).

Safety: it binds to 127.0.0.1 unless told otherwise; an optional shared token
is checked at the handshake (`Authorization: Bearer TOKEN`, compared in
constant time); a message above `max_message_bytes` closes that connection
(close code 1009) before it is read into memory; every request is validated
before it reaches the queue (image shape, dtype and size; instruction type,
emptiness and length; NaN or infinity in any number; truncated or non-msgpack
bytes; unknown fields) and a bad one is answered with an error that names the
field. A failure inside a merged decode is retried request by request, so one
bad request never costs another client its answer. A client that disconnects
mid-request costs nothing but its own reply. The server must never execute
anything a message describes, and never let one connection stop another.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import http
import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vla_scale.errors import VLAScaleError
from vla_scale.policy.wire import PROTOCOL, WireError, packb, unpackb

log = logging.getLogger("vla_scale.serve")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
TOKEN_ENV = "VLA_SCALE_SERVE_TOKEN"  # the shared token, for commands that should not show it in `ps`
METHODS = ("predict_action", "predict_actions", "metadata", "stats")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may hold. Above `max_message_bytes` the connection is closed unread."""

    max_message_bytes: int = 64 << 20
    max_image_side: int = 2048  # pixels, each of H and W
    max_instruction_chars: int = 1000
    max_rows: int = 256  # observations in one predict_actions request
    max_cameras: int = 8  # images in one observation ({camera: image})
    max_state_dim: int = 1024  # numbers in one state


class RequestError(Exception):
    """A request that cannot be served; `field` names the part that was wrong."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass
class Request:
    id: Any
    method: str
    images: list[Any] = field(default_factory=list)  # per row: an image, or {camera: image}
    instructions: list[str] = field(default_factory=list)
    states: list[np.ndarray | None] = field(default_factory=list)  # per row (None: not sent)

    @property
    def rows(self) -> int:
        return len(self.images)


_FIELDS = {"predict_action": ("image", "instruction"), "predict_actions": ("images", "instructions"),
           "metadata": (), "stats": ()}
_OPTIONAL = {"predict_action": ("state",), "predict_actions": ("states",), "metadata": (), "stats": ()}


def _nonfinite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in `value` (numbers, float arrays, lists, maps), or None."""
    if isinstance(value, float):
        return path if not math.isfinite(value) else None
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return path if not np.isfinite(value).all() else None
    if isinstance(value, np.floating):
        return path if not np.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if (found := _nonfinite(v, f"{path}[{i}]")) is not None:
                return found
    if isinstance(value, dict):
        for k, v in value.items():
            if (found := _nonfinite(v, f"{path}.{k}" if path else str(k))) is not None:
                return found
    return None


def _observation_image(value: Any, where: str, limits: ServeLimits) -> Any:
    """One image, or {camera: image} for a model trained on several cameras."""
    if not isinstance(value, dict):
        return _image(value, where, limits)
    if not value:
        raise RequestError(where, "no camera images given (an empty map)")
    if len(value) > limits.max_cameras:
        raise RequestError(where, f"{len(value)} cameras; at most {limits.max_cameras} are served")
    for name in value:
        if not isinstance(name, str) or not name:
            raise RequestError(where, f"camera names must be non-empty strings, got {name!r}")
    return {name: _image(image, f"{where}.{name}", limits) for name, image in value.items()}


def _state(value: Any, where: str, limits: ServeLimits) -> np.ndarray:
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        value = np.asarray(value, dtype=np.float64)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise RequestError(where, f"expected a 1-D array of numbers (the raw robot state), got "
                                  f"{getattr(value, 'dtype', type(value).__name__)}")
    if value.ndim != 1 or not 1 <= value.shape[0] <= limits.max_state_dim:
        raise RequestError(where, f"expected a 1-D state of 1 to {limits.max_state_dim} numbers, got shape "
                                  f"{tuple(value.shape)}")
    return value


def _image(value: Any, where: str, limits: ServeLimits) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise RequestError(where, f"expected a uint8 numpy array of shape (H, W, 3), got {type(value).__name__}")
    if value.ndim != 3 or value.shape[2] != 3:
        raise RequestError(where, f"expected an RGB image of shape (H, W, 3), got {tuple(value.shape)}")
    if value.dtype != np.uint8:
        raise RequestError(where, f"expected a uint8 image, got {value.dtype}")
    h, w = value.shape[:2]
    if not (1 <= h <= limits.max_image_side and 1 <= w <= limits.max_image_side):
        raise RequestError(where, f"image is {h}x{w}; each side must be 1 to {limits.max_image_side} pixels")
    return value


def _instruction(value: Any, where: str, limits: ServeLimits) -> str:
    if not isinstance(value, str):
        raise RequestError(where, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RequestError(where, "the instruction is empty")
    if len(value) > limits.max_instruction_chars:
        raise RequestError(where, f"the instruction has {len(value)} characters; at most "
                                  f"{limits.max_instruction_chars} are served")
    if "\x00" in value:
        raise RequestError(where, "the instruction contains a NUL character")
    return value


def parse_request(message: Any, limits: ServeLimits) -> Request:
    """A validated `Request` from an unpacked message; `RequestError` naming the field otherwise."""
    if not isinstance(message, dict):
        raise RequestError("message", f"expected a map (request fields), got {type(message).__name__}")
    if (bad := _nonfinite(message, "")) is not None:
        raise RequestError(bad, "NaN or infinity in a numeric field")
    rid = message.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
        raise RequestError("id", f"expected an integer or string, got {type(rid).__name__}")
    method = message.get("method")
    if method not in METHODS:
        raise RequestError("method", f"expected one of {', '.join(METHODS)}, got {method!r}")
    allowed = {"id", "method", *_FIELDS[method], *_OPTIONAL[method]}
    for key in message:
        if key not in allowed:
            raise RequestError(str(key), f"unknown field for {method}; fields: {', '.join(sorted(allowed))}")
    for key in _FIELDS[method]:
        if key not in message:
            raise RequestError(key, f"missing (required by {method})")
    if method == "predict_action":
        state = message.get("state")
        return Request(rid, method, [_observation_image(message["image"], "image", limits)],
                       [_instruction(message["instruction"], "instruction", limits)],
                       [None if state is None else _state(state, "state", limits)])
    if method == "predict_actions":
        images, texts = message["images"], message["instructions"]
        for name, value in (("images", images), ("instructions", texts)):
            if not isinstance(value, (list, tuple)):
                raise RequestError(name, f"expected a list, got {type(value).__name__}")
        if not images:
            raise RequestError("images", "no observations given")
        if len(images) > limits.max_rows:
            raise RequestError("images", f"{len(images)} observations; at most {limits.max_rows} per request")
        if len(images) != len(texts):
            raise RequestError("instructions", f"{len(images)} images but {len(texts)} instructions")
        states = message.get("states")
        if states is None:
            states = [None] * len(images)
        elif not isinstance(states, (list, tuple)):
            raise RequestError("states", f"expected a list, got {type(states).__name__}")
        elif len(states) != len(images):
            raise RequestError("states", f"{len(images)} images but {len(states)} states")
        return Request(rid, method, [_observation_image(v, f"images[{i}]", limits) for i, v in enumerate(images)],
                       [_instruction(v, f"instructions[{i}]", limits) for i, v in enumerate(texts)],
                       [None if v is None else _state(v, f"states[{i}]", limits) for i, v in enumerate(states)])
    return Request(rid, method)


def _error(rid: Any, kind: str, where: str, message: str) -> dict:
    return {"id": rid, "error": {"type": kind, "field": where, "message": message}}


@dataclass(eq=False)
class _Pending:
    request: Request
    future: asyncio.Future
    connection: Any


class PolicyServer:
    """A `VLAPolicy` (or anything with `predict_actions`) served over websockets with request batching."""

    def __init__(self, policy: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 max_batch: int = 32, batch_wait_ms: float = 0.0, limits: ServeLimits = ServeLimits(),
                 name: str = "policy"):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.policy, self.host, self.port, self.token = policy, host, int(port), token or None
        self.max_batch, self.batch_wait_s, self.limits, self.name = int(max_batch), batch_wait_ms / 1e3, limits, name
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=100_000)  # rows of every decode
        self.requests_served = 0
        self.requests_refused = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        # The model runs in one worker thread: decodes never overlap, and the event loop stays free to
        # receive, validate and queue the next requests while a batch decodes.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-decode")

    # -- public ----------------------------------------------------------------
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def metadata(self) -> dict:
        actions = getattr(self.policy, "actions", None)
        return {"type": "metadata", "protocol": PROTOCOL, "server": "vla-scale", "name": self.name,
                "action_dim": getattr(actions, "dim", None), "chunk": getattr(actions, "chunk", None),
                "unnorm_key": getattr(self.policy, "unnorm_key", None), "max_batch": self.max_batch,
                "cameras": self._cameras(),
                "state": getattr(self.policy, "state_mode", "none"),
                "token_required": self.token is not None, **asdict(self.limits)}

    def stats(self) -> dict:
        sizes = list(self.batch_sizes)
        return {"decodes": len(sizes), "rows": sum(sizes), "max_batch_rows": max(sizes, default=0),
                "histogram": {str(k): v for k, v in sorted(collections.Counter(sizes).items())},
                "requests_served": self.requests_served, "requests_refused": self.requests_refused}

    def start(self, timeout: float = 60.0) -> "PolicyServer":
        """Serve from a background thread; returns once listening (`port` is then the bound port)."""
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="vla-serve", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._startup_error is not None:
            raise RuntimeError(f"policy server did not start on {self.host}:{self.port}: {self._startup_error}")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Close every connection and stop (the thread started by `start`)."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def serve_forever(self, on_ready=None) -> None:
        """Serve in this thread until SIGINT or SIGTERM (the CLI)."""
        import signal

        async def main():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: self._stop.set() if self._stop else None)
            await self._main(on_ready)

        asyncio.run(main())
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the event loop -----------------------------------------------------------
    async def _main(self, on_ready=None) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._pending: set[_Pending] = set()
        try:
            server = await serve(self._handle, self.host, self.port, max_size=self.limits.max_message_bytes,
                                 compression=None, process_request=self._check_token,
                                 ping_interval=20, ping_timeout=60)
        except OSError as err:
            self._startup_error = err
            self._ready.set()
            raise
        async with server:
            self.port = server.sockets[0].getsockname()[1]
            batcher = asyncio.create_task(self._batcher())
            self._ready.set()
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
            batcher.cancel()
            # Every handler still waiting gets an answer, so that closing the connections cannot hang on one.
            while not self._queue.empty():
                self._pending.add(self._queue.get_nowait())
            for p in list(self._pending):
                self._resolve(p, _error(p.request.id, "PolicyServerError", "server", "the server is stopping"))

    def _check_token(self, connection, request):
        if self.token is None:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        self.requests_refused += 1
        return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")

    async def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await connection.send(packb(self.metadata()))
            async for message in connection:
                reply = await self._answer(message, connection)
                await connection.send(packb(reply))
        except ConnectionClosed:
            pass  # the client left (perhaps mid-request): its reply, if any, is dropped; nobody else notices

    async def _answer(self, message: Any, connection) -> dict:
        try:
            data = unpackb(message)
        except WireError as err:
            self.requests_refused += 1
            return _error(None, "DataError", "message", f"message: {err}")
        try:
            try:
                request = parse_request(data, self.limits)
            except RecursionError:
                raise RequestError("message", "nested too deeply") from None
        except RequestError as err:
            self.requests_refused += 1
            rid = data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), (int, str)) else None
            return _error(rid, "DataError", err.field, str(err))
        if request.method == "metadata":
            return {"id": request.id, **self.metadata()}
        if request.method == "stats":
            return {"id": request.id, **self.stats()}
        try:
            self._check_inputs(request)
        except RequestError as err:
            self.requests_refused += 1
            return _error(request.id, "DataError", err.field, str(err))
        pending = _Pending(request, asyncio.get_running_loop().create_future(), connection)
        self._pending.add(pending)  # until answered: `_main` answers whatever is left when stopping
        await self._queue.put(pending)
        return await pending.future

    def _cameras(self) -> list[str]:
        """The served model's cameras in prefix order (one primary camera unless it says otherwise)."""
        return list(getattr(self.policy, "cameras", None) or ["primary"])

    def _check_inputs(self, request: Request) -> None:
        """What the served model needs: every camera it was trained on, and the state when it reads one."""
        cameras = self._cameras()
        reads_state = getattr(self.policy, "state_mode", "none") != "none"
        one = request.method == "predict_action"
        for i, (image, state) in enumerate(zip(request.images, request.states)):
            where = "image" if one else f"images[{i}]"
            if len(cameras) > 1 and not (isinstance(image, dict) and set(cameras) <= set(image)):
                have = sorted(image) if isinstance(image, dict) else "one image"
                raise RequestError(where, f"this model sees cameras {cameras}; send {{camera: image}} with each "
                                          f"(got {have})")
            if reads_state and state is None:
                raise RequestError("state" if one else f"states[{i}]",
                                   "this model reads the robot state; send the raw state with each observation")

    # -- batching -------------------------------------------------------------------
    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        held: _Pending | None = None
        getter: asyncio.Task | None = None  # a pending queue.get, kept across timeouts (never cancelled: no lost item)

        async def next_item(timeout: float | None) -> _Pending | None:
            nonlocal getter
            if getter is None:
                getter = asyncio.ensure_future(self._queue.get())
            done, _ = await asyncio.wait({getter}, timeout=timeout)
            if not done:
                return None
            item, getter = getter.result(), None
            return item

        while True:
            first = held if held is not None else await next_item(None)
            held = None
            batch, rows = [first], first.request.rows
            deadline = loop.time() + self.batch_wait_s
            while rows < self.max_batch:
                item = await next_item(max(0.0, deadline - loop.time()))
                if item is None:
                    break
                if rows + item.request.rows > self.max_batch:
                    held = item  # first in the next batch: arrival order is kept
                    break
                batch.append(item)
                rows += item.request.rows
            # A client that left while queued is not decoded for; its handler gets a reply it cannot send.
            live = []
            for p in batch:
                if p.connection.state.name == "OPEN":
                    live.append(p)
                else:
                    self._resolve(p, _error(p.request.id, "Cancelled", "connection", "the client disconnected"))
            if not live:
                continue
            replies = await loop.run_in_executor(self._executor, self._decode, [p.request for p in live])
            for pending, reply in zip(live, replies):
                self._resolve(pending, reply)

    def _resolve(self, pending: _Pending, reply: dict) -> None:
        self._pending.discard(pending)
        if not pending.future.done():
            pending.future.set_result(reply)

    def _decode(self, requests: list[Request]) -> list[dict]:
        """One `predict_actions` over all rows of `requests` (in slices of max_batch); on failure, each
        request alone, so that only the one that fails gets the error."""
        try:
            return self._decode_together(requests)
        except Exception as err:
            if len(requests) == 1:
                return [self._failure(requests[0], err)]
        replies = []
        for request in requests:
            try:
                replies.extend(self._decode_together([request]))
            except Exception as err:
                replies.append(self._failure(request, err))
        return replies

    def _decode_together(self, requests: list[Request]) -> list[dict]:
        images = [im for r in requests for im in r.images]
        texts = [t for r in requests for t in r.instructions]
        states = [s for r in requests for s in r.states]
        with_states = any(s is not None for s in states)
        actions, passes = [], []
        for start in range(0, len(images), self.max_batch):
            rows = slice(start, start + self.max_batch)
            extra = {"states": states[rows]} if with_states else {}
            part = self.policy.predict_actions(images[rows], texts[rows], **extra)
            actions.append(np.asarray(part, dtype=np.float32))
            self.batch_sizes.append(len(part))
            decode = getattr(self.policy, "last_batch_decode", None)
            passes.extend([row.forward_passes for row in decode.rows] if decode is not None else [None] * len(part))
        actions = np.concatenate(actions)
        replies, at = [], 0
        for r in requests:
            rows = slice(at, at + r.rows)
            at += r.rows
            reply = {"id": r.id, "forward_passes": passes[rows], "batch_rows": len(images)}
            if r.method == "predict_action":
                reply["action"] = actions[rows.start]
            else:
                reply["actions"] = actions[rows]
            replies.append(reply)
        self.requests_served += len(requests)
        return replies

    def _failure(self, request: Request, err: Exception) -> dict:
        self.requests_refused += 1
        if isinstance(err, VLAScaleError):
            return _error(request.id, type(err).__name__, "images" if request.method == "predict_actions" else "image",
                          str(err))
        log.exception("decode failed", exc_info=err)
        return _error(request.id, "InternalError", "server", f"the decode failed: {type(err).__name__}: {err}")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK
