"""Import mosaicml-streaming on machines without a working torchvision.

`import streaming` imports `streaming.vision`, which imports torchvision at
top level. CPU machines have no CPU build of torchvision (and the CUDA build
fails on import), while nothing of ours uses `streaming.vision`. When, and
only when, torchvision cannot be imported, a minimal stand-in with a real
`__spec__` (transformers inspects it) is registered before importing
streaming. On GPU machines the real torchvision is imported and used.
This module must never shadow a working torchvision.

It also makes streaming's shared memory live as long as its owner, not as
long as the process: streaming registers every `SharedMemory` wrapper's
`cleanup` with `atexit`, which keeps each one (and its file descriptor)
alive until exit, so a process that builds many datasets (the demo's and
the ablation's runs, validation, the test suite) runs out of descriptors.
With the patch a wrapper closes its mappings when it is garbage collected,
and the blocks it created are still unlinked at exit, by name, as before.
"""
from __future__ import annotations

import atexit
import importlib.machinery
import sys
import types
import weakref


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


class _OwnerBoundCleanup:
    """Stands in for the `atexit` module inside streaming's shared-memory module (see the module docstring)."""

    def __init__(self) -> None:
        self._created: set[str] = set()
        atexit.register(self._unlink_created)

    def register(self, func, *args, **kwargs):
        owner = getattr(func, "__self__", None)
        if owner is None or not hasattr(owner, "created_shms") or args or kwargs:
            return atexit.register(func, *args, **kwargs)
        for shm in owner.created_shms:
            self._created.add(shm.name)
        weakref.finalize(owner, _close_all, list(owner.created_shms) + list(owner.opened_shms))
        return func

    def unregister(self, func):
        return atexit.unregister(func)

    def _unlink_created(self) -> None:
        from multiprocessing import resource_tracker, shared_memory

        for name in self._created:
            try:
                shared_memory._posixshmem.shm_unlink("/" + name.lstrip("/"))  # type: ignore[attr-defined]
            except (FileNotFoundError, AttributeError, OSError):
                continue
            try:
                resource_tracker.unregister("/" + name.lstrip("/"), "shared_memory")
            except Exception:  # the tracker may already be gone at exit
                pass


def _close_all(shms) -> None:
    for shm in shms:
        try:
            shm.close()
        except (BufferError, OSError):  # still viewed by a live array, or already closed: leave it
            pass


def _bind_shared_memory_to_owners() -> None:
    memory = sys.modules.get("streaming.base.shared.memory")
    if memory is not None and not isinstance(getattr(memory, "atexit", None), _OwnerBoundCleanup):
        memory.atexit = _OwnerBoundCleanup()


def import_streaming():
    """The `streaming` module, importable with or without torchvision."""
    if "streaming" in sys.modules:
        _bind_shared_memory_to_owners()
        return sys.modules["streaming"]
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or the CUDA build failing on a CPU machine
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        _install_torchvision_stand_in()
    import streaming

    _bind_shared_memory_to_owners()
    return streaming
