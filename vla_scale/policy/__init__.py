"""Inference: a trained VLA as a robot policy with grammar-constrained decoding, in process
(`VLAPolicy`) or served over websockets (`PolicyServer`, `vla-scale serve`) and called remotely
(`RemotePolicy`, same interface). The remote side is imported on first use, so that the in-process
policy needs neither websockets nor msgpack."""
from vla_scale.policy.policy import VLAPolicy

__all__ = ["RemotePolicy", "VLAPolicy"]


def __getattr__(name: str):
    if name == "RemotePolicy":
        from vla_scale.policy.remote import RemotePolicy

        return RemotePolicy
    raise AttributeError(f"module 'vla_scale.policy' has no attribute {name!r}")
