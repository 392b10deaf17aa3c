"""Inference: a trained VLA as a robot policy with grammar-constrained decoding."""
from vla_scale.policy.policy import VLAPolicy

__all__ = ["VLAPolicy"]
