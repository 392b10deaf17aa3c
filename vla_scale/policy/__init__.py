"""Inference: a trained VLA as a robot policy with grammar-constrained decoding, in process
(`VLAPolicy`) or served over websockets (`PolicyServer`, `vla-scale serve`) and called remotely
(`RemotePolicy`, same interface)."""
from vla_scale.policy.policy import VLAPolicy
from vla_scale.policy.remote import RemotePolicy

__all__ = ["RemotePolicy", "VLAPolicy"]
