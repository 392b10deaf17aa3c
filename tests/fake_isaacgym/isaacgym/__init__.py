"""A physics-free stand-in for Isaac Gym's Python API, for tests only (see gymapi.py here).

Like the real package, it refuses to load after torch."""
import sys

if "torch" in sys.modules:
    raise ImportError("PyTorch was imported before isaacgym modules.  Please import torch after isaacgym modules.")
