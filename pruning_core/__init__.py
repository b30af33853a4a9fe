"""Pure-torch core of the pack: token geometry, scoring and selection, prune/recover,
schedules, and one policy module per method (SiTo, DaTo, CAT).

Nothing in this package imports ComfyUI; ``nodes/hooks/`` is the only bridge.
"""
