"""Rollouts: K environments in worker processes, one batched policy call per control step.

`run_episodes(backend, episodes, policy, envs=K)` runs a list of `Episode`s
(from `Backend.plan`) and returns one `EpisodeResult` per episode, in the
order given. How it runs:

- With `envs=1` the backend lives in this process (unless it cannot share
  a process with torch: Isaac Gym; then one worker). With `envs=K>1` each
  of K worker processes (multiprocessing "spawn": forking a process that
  holds a GL context hangs) owns one backend, built from the backend's
  registered name and picklable keyword arguments.
- Lockstep: every control round, each worker with an episode in progress
  has sent its observation; the policy is called ONCE on all of them
  (`VLAPolicy.predict_actions` is one batched prefill and decode), and each
  worker gets its row back. A worker whose episode ended starts the next
  queued one; its first observation joins the next round.
- Action chunks: a row of shape (T, D) is executed open-loop for
  `execute` steps (default: all T) before the policy is asked again, as
  openpi and OpenVLA-OFT do.
- An episode ends at its first success (LIBERO's and SimplerEnv's rule),
  when its step budget runs out, or when a scripted expert says it is done.
- Per-episode results do not depend on K: a backend episode is a function
  of (task, seed, variant), `predict_actions` returns each row what it
  would return alone, and the random policy draws from a generator seeded
  by (policy seed, episode, step). Tested: K=1 and K=3 agree exactly.
- Scripted experts (`ExpertPolicy`) need the simulator's privileged state,
  so they run inside the worker, one whole episode per message.

Frames of selected episodes (the first camera, every step) come back with
their results for the report's GIFs.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import time
import traceback
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from vla_scale.errors import ConfigError, EvalError, VLAScaleError
from vla_scale.eval.backend import ACTION_DIM, Backend, Episode, Observation

# Registered backends: name -> "module:Class". Importing the class never imports the simulator.
BACKENDS = {
    "mujoco": "vla_scale.eval.mujoco_backend:MujocoBackend",
    "libero": "vla_scale.eval.libero_backend:LiberoBackend",
    "isaacgym": "vla_scale.eval.isaacgym_backend:IsaacGymBackend",
}
WORKER_TIMEOUT_S = 600.0  # one message (a reset, a chunk, or a whole expert episode) must finish in this


def backend_class(name: str) -> type[Backend]:
    """The registered backend class (its module is imported; its simulator is not).

    MuJoCo-based backends render offscreen: on a Linux machine without a display, MUJOCO_GL defaults to
    egl here (llvmpipe on a CPU machine, the GPU's EGL on a cluster node) unless the user chose one;
    spawned workers inherit it."""
    if name in ("mujoco", "libero") and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    if name not in BACKENDS:
        raise ConfigError(f"unknown evaluation backend {name!r}; backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as err:
        raise ConfigError(f"the {name} backend is not available in this installation ({err})") from None


# --------------------------------------------------------------------------- results


@dataclass
class EpisodeResult:
    """What one episode did. `frames` (uint8 images of the first camera, one per observation) is filled
    only for recorded episodes and is never written to JSON."""
    task: str
    variant: str
    seed: int
    index: int
    success: bool
    steps: int  # control steps taken (to the first success, or the whole budget)
    instruction: str
    env_seconds: float = 0.0  # time inside the simulator (reset and steps), in its worker
    frames: list[np.ndarray] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("frames")
        return d

    def outcome(self) -> tuple:
        """The part that must not depend on how the episodes were spread over processes."""
        return (self.task, self.variant, self.seed, self.index, self.success, self.steps, self.instruction)


# --------------------------------------------------------------------------- policies


class RolloutPolicy(Protocol):
    name: str

    def act(self, observations: Sequence[Observation], episodes: Sequence[Episode], steps: Sequence[int]
            ) -> Sequence[np.ndarray]:
        """One action (D,) or chunk (T, D) per row; `steps[i]` is how many steps episode i has taken."""
        ...


class ExpertPolicy:
    """The backend's scripted expert (`Backend.expert()`), run inside the worker that owns the simulator."""
    name = "expert"
    in_worker = True

    def act(self, observations, episodes, steps):  # pragma: no cover - never called: see in_worker
        raise EvalError("the expert policy runs inside the simulator's worker")


class RandomPolicy:
    """Uniform random deltas within the built-in backend's per-step limits (2 cm, 0.1 rad) and a random
    gripper command, from a generator seeded by (seed, episode, step): the floor any policy must beat."""
    name = "random"
    SCALE = np.array([0.02, 0.02, 0.02, 0.1, 0.1, 0.1])

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def act(self, observations, episodes, steps):
        out = []
        for ep, t in zip(episodes, steps):
            key = zlib.crc32(f"{ep.task}/{ep.variant}".encode())
            rng = np.random.default_rng([self.seed, key, ep.seed, t])
            out.append(np.concatenate([rng.uniform(-1, 1, 6) * self.SCALE, [float(rng.integers(2))]]))
        return out


class ModelPolicy:
    """A `VLAPolicy` (an export) or a `RemotePolicy` as a rollout policy: one batched `predict_actions` per round.

    It gives the model what it was trained on: a model of one camera gets `camera` (default: the backend's
    first camera); a model of several cameras (`policy.cameras`) gets {camera: image} with each of them,
    by name; a model that reads the robot state (`policy.state_mode`) gets each observation's raw state.
    `batched=False` calls `predict_action` row by row (same actions; for measuring the batching gain)."""

    def __init__(self, policy: Any, camera: str | None = None, batched: bool = True, name: str = "model") -> None:
        self.policy, self.camera, self.batched, self.name = policy, camera, batched, name

    def _model_cameras(self) -> list[str]:
        """The cameras the model was trained on, in prefix order (empty when the policy does not say)."""
        return list(getattr(self.policy, "cameras", None) or [])

    @property
    def cameras(self) -> list[str]:
        """The cameras the model reads (one unless it was trained on several)."""
        cameras = self._model_cameras()
        return cameras if len(cameras) > 1 else [self.camera] if self.camera else []

    @property
    def reads_state(self) -> bool:
        return getattr(self.policy, "state_mode", "none") != "none"

    def _image(self, obs: Observation, cameras: list[str]) -> Any:
        if not obs.images:
            raise EvalError("the model policy needs camera images, but the backend rendered none")
        if len(cameras) > 1:
            missing = [c for c in cameras if c not in obs.images]
            if missing:
                raise ConfigError(f"the model sees cameras {cameras}, but {missing} are not rendered (cameras "
                                  f"rendered: {sorted(obs.images)}); render them (--cameras {','.join(cameras)})")
            return {c: obs.images[c] for c in cameras}
        if self.camera is None:
            return next(iter(obs.images.values()))
        if self.camera not in obs.images:
            raise ConfigError(f"camera {self.camera!r} is not rendered; cameras: {sorted(obs.images)}")
        return obs.images[self.camera]

    def act(self, observations, episodes, steps):
        cameras = self._model_cameras()  # once per round, not per observation
        images = [self._image(o, cameras) for o in observations]
        texts = [o.instruction for o in observations]
        states = [o.state for o in observations] if self.reads_state else None
        if self.batched:
            return list(self.policy.predict_actions(images, texts, states) if states is not None
                        else self.policy.predict_actions(images, texts))
        if states is None:
            return [self.policy.predict_action(i, t) for i, t in zip(images, texts)]
        return [self.policy.predict_action(i, t, s) for i, t, s in zip(images, texts, states)]


def load_policy(spec: str, *, seed: int = 0, device: str | None = None, camera: str | None = None) -> Any:
    """'expert', 'random', an export folder, or a policy server's URL (ws://HOST:PORT, `vla-scale serve`)."""
    if spec == "expert":
        return ExpertPolicy()
    if spec == "random":
        return RandomPolicy(seed)
    if spec.startswith(("ws://", "wss://")):
        from vla_scale.policy import RemotePolicy

        return ModelPolicy(RemotePolicy(spec), camera=camera, name=remote_policy_name(spec))
    if not os.path.isdir(spec):
        raise ConfigError(f"--policy {spec!r}: not 'expert', 'random', an export folder or a ws:// URL")
    from vla_scale.policy import VLAPolicy

    return ModelPolicy(VLAPolicy.from_pretrained(spec, device=device), camera=camera,
                       name=os.path.basename(os.path.normpath(spec)))


def remote_policy_name(url: str) -> str:
    """A file-name-safe name for a served policy: ws://127.0.0.1:8000 -> remote-127.0.0.1-8000."""
    return "remote-" + "".join(c if c.isalnum() or c in ".-" else "-" for c in url.split("://", 1)[1]).strip("-")


def as_chunk(action: Any, where: str) -> np.ndarray:
    """A policy's row as a (T, 7) float array of finite numbers, or an EvalError naming the row."""
    a = np.asarray(action, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != ACTION_DIM or a.shape[0] < 1 or not np.all(np.isfinite(a)):
        raise EvalError(f"{where}: the policy returned {np.asarray(action).shape} "
                        f"(finite: {bool(np.all(np.isfinite(a)))}); expected ({ACTION_DIM},) or (T, {ACTION_DIM})")
    return a


# --------------------------------------------------------------------------- one environment


@dataclass
class _Reply:
    observation: Observation | None  # None when the episode ended
    result: EpisodeResult | None  # set when the episode ended
    steps: int = 0  # steps the episode has taken so far


class EnvSession:
    """One backend and the episode in progress on it; runs in a worker process or in this one."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.episode: Episode | None = None
        self.steps = 0
        self.instruction = ""
        self.frames: list[np.ndarray] | None = None
        self.env_seconds = 0.0

    def _keep(self, obs: Observation) -> None:
        if self.frames is not None and obs.images:
            self.frames.append(next(iter(obs.images.values())))

    def _end(self, success: bool) -> _Reply:
        ep = self.episode
        result = EpisodeResult(ep.task, ep.variant, ep.seed, ep.index, success, self.steps, self.instruction,
                               round(self.env_seconds, 4), self.frames)
        self.episode = None
        return _Reply(None, result, self.steps)

    def start(self, episode: Episode, record: bool, expert: bool) -> _Reply:
        t0 = time.perf_counter()
        obs = self.backend.reset_episode(episode)
        self.env_seconds = time.perf_counter() - t0
        self.episode, self.steps, self.instruction = episode, 0, obs.instruction
        self.frames = [] if record else None
        self._keep(obs)
        if not expert:
            return _Reply(obs, None, 0)
        policy = self.backend.expert()
        while self.steps < episode.max_steps:
            action, done = policy.act()
            if done:
                break
            reply = self.advance(np.asarray(action, dtype=np.float64)[None])
            if reply.result is not None:
                return reply
        return self._end(self.backend.success())

    def advance(self, chunk: np.ndarray) -> _Reply:
        if self.episode is None:
            raise EvalError("advance() without an episode in progress")
        t0 = time.perf_counter()
        obs = None
        try:
            for action in chunk:
                obs = self.backend.step(action)
                self.steps += 1
                self._keep(obs)
                if self.backend.success():
                    return self._end(True)
                if self.steps >= self.episode.max_steps:
                    return self._end(False)
        finally:
            self.env_seconds += time.perf_counter() - t0
        return _Reply(obs, None, self.steps)

    def handle(self, message: tuple) -> _Reply:
        kind, *args = message
        if kind == "start":
            return self.start(*args)
        if kind == "step":
            return self.advance(*args)
        raise EvalError(f"unknown message {kind!r}")


def _worker(conn: Connection, backend_name: str, backend_kwargs: dict[str, Any]) -> None:
    """A spawned worker: build the backend, then answer messages until told to close."""
    try:
        session = EnvSession(backend_class(backend_name)(**backend_kwargs))
        conn.send(("ready", None))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(), isinstance(err, VLAScaleError)))
        return
    try:
        while True:
            message = conn.recv()
            if message[0] == "close":
                break
            try:
                conn.send(("ok", session.handle(message)))
            except BaseException as err:  # noqa: BLE001
                conn.send(("error", f"{type(err).__name__}: {err}", traceback.format_exc(),
                           isinstance(err, VLAScaleError)))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        session.backend.close()


class _Env:
    """The parent's handle on one environment: in this process (K=1) or a spawned worker."""

    def __init__(self, backend_name: str, backend_kwargs: dict[str, Any], in_process: bool, slot: int) -> None:
        self.slot, self.episode, self._reply = slot, None, None
        self.in_process = in_process
        if in_process:
            self.session = EnvSession(backend_class(backend_name)(**backend_kwargs))
            return
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # K simulators must not each take every core
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            self.process = ctx.Process(target=_worker, args=(child, backend_name, backend_kwargs),
                                       name=f"vla-scale-eval-{slot}", daemon=True)
            self.process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()

    def wait_ready(self) -> None:
        """Wait for the worker's backend to exist (or raise its construction error)."""
        if not self.in_process:
            self._receive()

    def send(self, message: tuple) -> None:
        if self.in_process:
            self._reply = self.session.handle(message)
        else:
            self.conn.send(message)

    def _receive(self) -> Any:
        if not self.conn.poll(WORKER_TIMEOUT_S):
            raise EvalError(f"evaluation worker {self.slot} gave no answer in {WORKER_TIMEOUT_S:.0f} s")
        try:
            status, *payload = self.conn.recv()
        except (EOFError, ConnectionResetError):  # the worker's end closed: it died
            self.process.join(5)
            raise EvalError(f"evaluation worker {self.slot} died (exit code {self.process.exitcode})"
                            f"{'' if self.episode is None else ' during episode ' + self.episode.key}") from None
        if status == "error":
            message, trace, ours = payload
            where = f"evaluation worker {self.slot}" + ("" if self.episode is None else f", episode {self.episode.key}")
            if ours:
                raise ConfigError(f"{where}: {message}")
            raise EvalError(f"{where}: {message}\n{trace}")
        return payload[0]

    def receive(self) -> _Reply:
        if self.in_process:
            reply, self._reply = self._reply, None
            return reply
        return self._receive()

    def close(self) -> None:
        if self.in_process:
            self.session.backend.close()
            return
        try:
            self.conn.send(("close",))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


# --------------------------------------------------------------------------- the loop


@dataclass
class RunTiming:
    """Where the time went: policy calls in this process, simulator time summed over workers."""
    wall_seconds: float = 0.0
    policy_seconds: float = 0.0
    policy_calls: int = 0
    policy_rows: int = 0
    env_steps: int = 0


def run_episodes(backend: str, episodes: Sequence[Episode], policy: Any, *, envs: int = 1,
                 backend_kwargs: dict[str, Any] | None = None, record: Callable[[Episode], bool] | None = None,
                 execute: int | None = None, progress: Callable[[EpisodeResult], None] | None = None,
                 timing: RunTiming | None = None) -> list[EpisodeResult]:
    """Run `episodes` on `envs` environments of `backend` (a name in BACKENDS) under `policy`.

    `record(episode)` chooses the episodes whose frames are kept; `execute` caps how many steps of a
    chunk run before replanning; `progress` is called with each finished episode's result."""
    if envs < 1:
        raise ConfigError(f"envs must be at least 1, got {envs}")
    if execute is not None and execute < 1:
        raise ConfigError(f"execute must be at least 1 step of a chunk, got {execute}")
    cls = backend_class(backend)  # an unknown or unavailable backend fails here, before any process starts
    in_process = envs == 1 and cls.in_process_ok
    kwargs = dict(backend_kwargs or {})
    expert = bool(getattr(policy, "in_worker", False))
    record = record or (lambda ep: False)
    timing = timing if timing is not None else RunTiming()
    t_start = time.perf_counter()
    queue = deque(episodes)
    results: dict[int, EpisodeResult] = {}
    order = {id(ep): i for i, ep in enumerate(episodes)}
    count = min(envs, len(episodes))
    pool: list[_Env] = []
    try:
        for slot in range(count):  # start every worker, then wait: their imports overlap
            pool.append(_Env(backend, kwargs, in_process=in_process, slot=slot))
        for env in pool:
            env.wait_ready()

        def start_next(env: _Env) -> bool:
            if not queue:
                env.episode = None
                return False
            env.episode = queue.popleft()
            env.send(("start", env.episode, record(env.episode), expert))
            return True

        waiting = [env for env in pool if start_next(env)]
        while waiting:
            need: list[tuple[_Env, _Reply | None]] = []
            for env in waiting:  # lockstep: the round ends when every environment has answered
                reply = env.receive()
                if reply.result is not None:
                    results[order[id(env.episode)]] = reply.result
                    timing.env_steps += reply.result.steps
                    if progress is not None:
                        progress(reply.result)
                    if start_next(env):
                        need.append((env, None))  # its first observation arrives next round
                else:
                    need.append((env, reply))
            acting = [(env, reply) for env, reply in need if reply is not None]
            if acting:
                t0 = time.perf_counter()
                rows = policy.act([r.observation for _, r in acting], [env.episode for env, _ in acting],
                                  [r.steps for _, r in acting])
                timing.policy_seconds += time.perf_counter() - t0
                timing.policy_calls += 1
                timing.policy_rows += len(acting)
                if len(rows) != len(acting):
                    raise EvalError(f"the policy returned {len(rows)} actions for {len(acting)} observations")
                for (env, _), row in zip(acting, rows):
                    chunk = as_chunk(row, f"episode {env.episode.key}")
                    env.send(("step", chunk if execute is None else chunk[:execute]))
            waiting = [env for env, _ in need]
    finally:
        for env in pool:
            env.close()
        timing.wall_seconds += time.perf_counter() - t_start
    return [results[i] for i in range(len(episodes))]
