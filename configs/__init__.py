"""The shipped presets (`*.yaml`) and architecture configs (`arch/*.json`), installed as `vla_scale.configs`.

Data only: `vla_scale.config.presets` finds these files by name.
"""
