"""Simulator evaluation (MuJoCo suite, Isaac Gym backend, perturbation suites). Not implemented yet."""
