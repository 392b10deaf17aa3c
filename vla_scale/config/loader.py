"""Load a run configuration: YAML preset + dotted overrides -> typed `Config`.

Merging is OmegaConf's structured-config merge, so types are checked and an
unknown key fails; we turn its errors into `ConfigError`s that name the key,
the file it came from, and the nearest valid key. Semantic checks (values
that are well-typed but meaningless together) live in `validate`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vla_scale.config.presets import resolve_config
from vla_scale.config.schema import Config
from vla_scale.errors import ConfigError

_CHOICES = {
    "model.source_type": ("auto", "llava", "paligemma", "parts"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "model.precision": ("auto", "fp32", "bf16"),
    "model.projector.init": ("source", "random"),
    "model.projector.activation": ("gelu", "gelu_tanh"),
    "actions.tokenizer": ("string", "bins"),
    "actions.style": ("fixed", "vla-plus"),
    "train.schedule": ("cosine", "constant"),
    "train.strategy": ("single", "deepspeed"),
    "train.on_nonfinite": ("skip", "stop"),
    "data.overlong": ("truncate", "drop", "error"),
    "data.state": ("none", "text", "projection"),
    "deepspeed.grad_accum_dtype": ("fp32", "bf16"),
    "deepspeed.communication_data_type": ("fp32", "bf16"),
}
TASKS = ("robot", "vqa", "spatial", "affordance")
# Encoders live in an nn.ModuleDict keyed by name; these names would shadow its methods.
_RESERVED_MODULE_NAMES = frozenset(n for n in dir(__import__("torch").nn.ModuleDict()) if not n.startswith("_"))


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts (list elements as `name.0.field`)."""
    keys: list[str] = []
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            full = f"{prefix}{f.name}"
            keys.append(full)
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                keys += _valid_keys(value, full + ".")
            elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                keys += [k.replace(f"{full}.0.", f"{full}.N.") for k in _valid_keys(value[0], full + ".0.")]
    return keys


def _nearest(key: str, candidates: Iterable[str]) -> str | None:
    cands = list(candidates)
    if "." in key:
        best = difflib.get_close_matches(key, cands, n=1, cutoff=0.6)
        if best:
            return best[0]
    leaf = key.rsplit(".", 1)[-1]
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    siblings = [c for c in cands if c.startswith(parent) and "." not in c[len(parent):]] if parent else cands
    by_leaf = {c.rsplit(".", 1)[-1]: c for c in siblings or cands}
    best = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.5)
    return by_leaf[best[0]] if best else None


def _schema_for_hints() -> Config:
    from vla_scale.config.schema import EncoderConfig, ModelConfig

    return Config(model=ModelConfig(encoders=[EncoderConfig()]))


def _explain(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = str(getattr(err, "full_key", None) or "")
    msg = str(err).splitlines()[0]
    m = re.search(r"Key '([^']+)' not in", msg)
    if m:
        leaf = m.group(1)
        if not key.endswith(leaf):
            key = f"{key}.{leaf}" if key else leaf
        norm = re.sub(r"\[(\d+)\]", r".N", key)
        norm = ".".join("N" if part.isdigit() else part for part in norm.split("."))
        near = _nearest(norm, _valid_keys(_schema_for_hints()))
        hint = f"; did you mean '{near}'?" if near else ""
        return ConfigError(f"{where}: unknown config key '{key}'{hint}")
    return ConfigError(f"{where}: invalid value for '{key}': {msg}")


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a `Config` from an optional YAML file (a path or a shipped preset's name, e.g.
    "openvla_plus_7b") and `a.b.c=value` overrides."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        p = resolve_config(path)
        try:
            raw = OmegaConf.load(p)
        except Exception as e:  # yaml syntax errors come in several types
            raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
        if raw is None or not OmegaConf.is_dict(raw):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        try:
            merged = OmegaConf.merge(merged, raw)
        except OmegaConfBaseException as e:
            raise _explain(e, str(p)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. train.lr=3e-4)")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            if OmegaConf.is_config(parsed):
                parsed = OmegaConf.to_container(parsed)
            OmegaConf.update(merged, key, parsed, merge=True)
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'") from None
        except (TypeError, ValueError, IndexError) as e:
            raise ConfigError(f"override '{item}': {e}") from None
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, str(path) if path else "config") from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a `Config` from a plain dict (e.g. one saved in a checkpoint)."""
    try:
        cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(data)))  # type: ignore
    except OmegaConfBaseException as e:
        raise _explain(e, "saved config") from None
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: readers never see half a file)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    os.replace(tmp, p)


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _validate_storage(st: Any) -> None:
    hashes = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_224", "sha3_256", "sha3_384",
              "sha3_512", "xxh32", "xxh64", "xxh128", "xxh3_64", "xxh3_128")  # streaming.base.hashing
    if st.validate_hash is not None and st.validate_hash not in hashes:
        near = difflib.get_close_matches(str(st.validate_hash), hashes, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"data.storage.validate_hash={st.validate_hash!r} is not one of {list(hashes)} or null"
                          f"{hint}")
    if st.cache_limit is not None:
        from vla_scale.data.streaming_compat import import_streaming

        import_streaming()
        from streaming.base.util import bytes_to_int

        try:
            if bytes_to_int(st.cache_limit) <= 0:
                raise ValueError("not positive")
        except (ValueError, TypeError) as e:
            raise ConfigError(f"data.storage.cache_limit={st.cache_limit!r}: use a size such as '200gb' or "
                              f"'500mb' ({e})") from None
    if not st.download_timeout_s > 0 or st.download_retry < 0:
        raise ConfigError(f"data.storage.download_timeout_s must be positive and data.storage.download_retry "
                          f">= 0, got {st.download_timeout_s}, {st.download_retry}")


def validate(cfg: Config) -> None:
    """Checks across fields; raises `ConfigError` naming the key."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            near = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{hint}")
    m, t, a, d = cfg.model, cfg.train, cfg.actions, cfg.data
    names = [e.name for e in m.encoders]
    if len(set(names)) != len(names):
        raise ConfigError(f"model.encoders: encoder names must be unique, got {names}")
    for i, e in enumerate(m.encoders):
        if not e.name.isidentifier() or e.name in _RESERVED_MODULE_NAMES:
            raise ConfigError(f"model.encoders.{i}.name={e.name!r}: use an identifier that is not a torch "
                              f"Module attribute (e.g. 'siglip_frozen', not 'train' or 'eval')")
        if e.select not in ("auto", "patch", "full"):
            raise ConfigError(f"model.encoders.{i}.select={e.select!r} is not one of ['auto', 'patch', 'full']")
    if m.source_type == "parts":
        if not m.llm:
            raise ConfigError("model.llm: source_type 'parts' needs the LLM folder")
        if any(e.path is None for e in m.encoders):
            raise ConfigError("model.encoders.N.path: source_type 'parts' needs a folder for every encoder")
        if m.projector.init == "source":
            raise ConfigError("model.projector.init: source_type 'parts' has no source projector; use 'random'")
    if m.image_size <= 0:
        raise ConfigError(f"model.image_size must be positive, got {m.image_size}")
    if a.dim <= 0 or a.chunk <= 0:
        raise ConfigError(f"actions.dim and actions.chunk must be positive, got {a.dim}, {a.chunk}")
    if not 1 <= a.decimals <= 8:
        raise ConfigError(f"actions.decimals must be in 1..8, got {a.decimals}")
    for k in a.keep_dims:
        if not 0 <= k < a.dim:
            raise ConfigError(f"actions.keep_dims: dimension {k} is outside 0..{a.dim - 1}")
    if d.max_length < 8:
        raise ConfigError(f"data.max_length={d.max_length} is too short for a prompt and an answer; use at least 8")
    if not d.sources:
        raise ConfigError("data.sources: at least one source is needed")
    # Cameras and state (issue 14): names become column names, the state mode needs its model part.
    if not d.cameras or len(set(d.cameras)) != len(d.cameras):
        raise ConfigError(f"data.cameras must list at least one camera, each once; got {list(d.cameras)}")
    for i, c in enumerate(d.cameras):
        if not c.isidentifier():
            raise ConfigError(f"data.cameras.{i}={c!r}: use a name like 'primary', 'wrist' or 'left_wrist' (it "
                              f"names the shard column image_<name>)")
    if d.state == "projection" and m.state_dim <= 0:
        raise ConfigError("data.state=projection needs model.state_dim set to the size of the robot state")
    if d.state != "projection" and m.state_dim:
        raise ConfigError(f"model.state_dim={m.state_dim} builds a state projection, but data.state={d.state!r} "
                          f"does not feed it; set data.state=projection or model.state_dim=0")
    if d.state == "text" and not 2 <= d.state_bins <= 1000:
        raise ConfigError(f"data.state_bins must be in 2..1000, got {d.state_bins}")
    for i, s in enumerate(d.sources):
        if s.task not in TASKS:
            near = difflib.get_close_matches(s.task, TASKS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"data.sources.{i}.task={s.task!r} is not one of {list(TASKS)}{hint}")
        if s.weight < 0:
            raise ConfigError(f"data.sources.{i}.weight must be >= 0, got {s.weight}")
    train_names = {s.name: s for s in d.sources}
    for i, s in enumerate(d.val_sources if t.val_every else []):  # checked when validation is on
        if s.name not in train_names:
            near = difflib.get_close_matches(s.name, list(train_names), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"data.val_sources.{i}.name={s.name!r} is not a training source "
                              f"({sorted(train_names)}){hint}: a validation set is held-out data of one")
    _validate_storage(d.storage)
    if d.val_samples <= 0:
        raise ConfigError(f"data.val_samples must be positive, got {d.val_samples}")
    if t.val_every < 0:
        raise ConfigError(f"train.val_every must be >= 0, got {t.val_every}")
    if t.val_every and not d.val_sources:
        raise ConfigError("train.val_every is set but data.val_sources is empty: name held-out shards "
                          "(e.g. data.val_sources=[{name: robot, path: /data/robot_val}])")
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources: the weights sum to zero")
    if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
        raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    ga = t.gradient_accumulation
    if ga != "auto" and (not isinstance(ga, int) or ga < 1):
        raise ConfigError(f"train.gradient_accumulation={ga!r}: use 'auto' (derived from the world size) or a "
                          "positive integer")
    if isinstance(ga, int) and t.global_batch_size % (t.micro_batch_size * ga):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size x train.gradient_accumulation = {t.micro_batch_size} x {ga}; "
                          "use train.gradient_accumulation=auto to derive it from the world size")
    if t.steps <= 0:
        raise ConfigError(f"train.steps must be positive, got {t.steps}")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be at least 1 (log every N steps), got {t.log_every}")
    if t.peak_flops is not None and not t.peak_flops > 0:
        raise ConfigError(f"train.peak_flops must be a positive FLOP/s figure (e.g. 989e12), got {t.peak_flops}")
    if len(t.betas) != 2:
        raise ConfigError(f"train.betas needs two values, got {t.betas}")
    if t.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    if t.warmup_steps > t.steps:
        # Common when shortening a preset from the command line (train.steps=2): warm up over the whole run.
        warnings.warn(f"train.warmup_steps={t.warmup_steps} exceeds train.steps={t.steps}; using {t.steps}",
                      stacklevel=2)
        t.warmup_steps = t.steps
