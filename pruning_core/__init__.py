"""Pure-torch core of the pack: token geometry, scoring and selection, prune/recover,
caches and schedules, and one policy module per method (SiTo, DaTo, CAT).

Nothing in this package imports ComfyUI; ``nodes/adapter.py`` is the only bridge.
"""
