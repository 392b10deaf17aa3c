"""Converters: source datasets on local disk -> MDS shards in the shard schema.

One function per kind, each `convert_<kind>(src, out, *, skip_bad=False,
overwrite=False, size_limit=..., compression=None, progress=True,
callback=None, ...) -> summary dict`, and `CONVERTERS` maps the kind names the
CLI accepts to them. Every converter streams (bounded memory), validates
(errors name file, episode and step), and writes atomically through
`ShardWriter`. Converters never download anything and never modify SRC.
"""
from __future__ import annotations

from typing import Any, Callable

from vla_scale.data.converters.common import BadSampleError
from vla_scale.data.converters.hdf5 import convert_hdf5
from vla_scale.data.converters.lerobot import convert_lerobot
from vla_scale.data.converters.llava import convert_llava
from vla_scale.data.converters.rlds import convert_rlds

CONVERTERS: dict[str, Callable[..., dict[str, Any]]] = {
    "lerobot": convert_lerobot,
    "hdf5": convert_hdf5,
    "llava": convert_llava,
    "rlds": convert_rlds,  # needs the optional extra vla-scale[rlds] (tensorflow-datasets)
}

__all__ = ["CONVERTERS", "BadSampleError", "convert_hdf5", "convert_lerobot", "convert_llava", "convert_rlds"]
