"""Import mosaicml-streaming on machines without a working torchvision.

`import streaming` imports `streaming.vision`, which imports torchvision at
top level. CPU machines have no CPU build of torchvision (and the CUDA build
fails on import), while nothing of ours uses `streaming.vision`. When, and
only when, torchvision cannot be imported, a minimal stand-in with a real
`__spec__` (transformers inspects it) is registered before importing
streaming. On GPU machines the real torchvision is imported and used.
This module must never shadow a working torchvision.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types


def _install_torchvision_stand_in() -> None:
    def module(name: str, package: bool = False) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
        if package:
            m.__path__ = []
        sys.modules[name] = m
        return m

    root = module("torchvision", package=True)
    datasets = module("torchvision.datasets")
    transforms = module("torchvision.transforms", package=True)
    functional = module("torchvision.transforms.functional")

    class VisionDataset:  # only subclassed by streaming.vision, never used by vla-scale
        def __init__(self, *args, **kwargs):
            raise ImportError("torchvision is not installed; streaming.vision datasets are unavailable")

    def to_tensor(*args, **kwargs):
        raise ImportError("torchvision is not installed")

    datasets.VisionDataset = VisionDataset
    functional.to_tensor = to_tensor
    root.datasets, root.transforms, transforms.functional = datasets, transforms, functional
    root.__version__ = "0.0.0+vla-scale-stand-in"


def import_streaming():
    """The `streaming` module, importable with or without torchvision."""
    if "streaming" in sys.modules:
        return sys.modules["streaming"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or the CUDA build failing on a CPU machine
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _install_torchvision_stand_in()
    import streaming

    return streaming
