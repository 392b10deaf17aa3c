"""The shipped presets, found by name wherever vla-scale is installed.

The YAML presets and the architecture JSONs live in the repository's
top-level `configs/` folder and are installed as the package
`vla_scale.configs` (setup.cfg maps the folder, as it does `kernels/` and
`launch/`), so a wheel on a cluster node carries them and an editable install
reads the checkout's files. `resolve_config` turns what a user typed
(`openvla_plus_7b`, `tiny.yaml`, or a path) into a file: an existing path
always wins, otherwise a preset of that name. Presets name their architecture
JSONs by bare name (`llm_arch: llama2_7b`); those resolve in the `arch/`
folder next to the preset, which is the installed one when the preset is.

This module only locates files (through importlib.resources); it never
parses them, and never looks anywhere but the given path and the package.
"""
from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from vla_scale.errors import ConfigError

PRESETS_PACKAGE = "vla_scale.configs"
_SUFFIX = ".yaml"


def preset_dir() -> Path:
    """The installed `configs/` folder (the checkout's, under an editable install)."""
    try:
        folder = resources.files(PRESETS_PACKAGE)
    except ModuleNotFoundError:
        raise ConfigError(f"the presets package {PRESETS_PACKAGE} is not installed; an editable install made "
                          "before the presets were packaged does not map configs/ to it: re-run `bash install.sh` "
                          "(or pip install -e .), or give the config's path") from None
    # Wheels are installed unpacked, so this is a real folder; a zipped install could not hand
    # preset paths to the arch lookup, and is refused with a clear error rather than half working.
    if not isinstance(folder, Path) or not folder.is_dir():
        raise ConfigError(f"the presets package {PRESETS_PACKAGE} is not a folder on disk ({folder}); "
                          "install vla-scale unzipped (pip install does)")
    return folder


def arch_dir() -> Path:
    """The installed architecture JSONs (`configs/arch/`), where bare `arch` names are looked up."""
    return preset_dir() / "arch"


def preset_names() -> list[str]:
    """Names of the shipped presets, e.g. ['openvla_plus_7b', 'pi0_plus_3b', ..., 'tiny']."""
    return sorted(p.name[:-len(_SUFFIX)] for p in preset_dir().glob(f"*{_SUFFIX}"))


def preset_path(name: str) -> Path:
    """The shipped preset `name` (with or without .yaml); `ConfigError` naming the presets otherwise."""
    stem = name[:-len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    path = preset_dir() / f"{stem}{_SUFFIX}"
    if path.is_file():
        return path
    names = preset_names()
    near = difflib.get_close_matches(stem, names, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"config {name!r}: no such file, and not a shipped preset ({', '.join(names)}){hint}")


def resolve_config(value: str | os.PathLike) -> Path:
    """A config file from a path or a preset name: an existing file wins, then a preset of that name."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    text = str(value)
    if os.sep in text or "/" in text:  # meant as a path: say so rather than guess a preset
        raise ConfigError(f"config file not found: {path}")
    return preset_path(text)


__all__ = ["arch_dir", "preset_dir", "preset_names", "preset_path", "resolve_config"]
