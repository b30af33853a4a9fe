"""Version-tolerant construction of V3 schema objects.

ComfyUI keeps adding keyword arguments to ``io.Schema`` and the ``io.*.Input`` classes
(``advanced``, ``search_aliases`` … in 0.38.x), and passing one an older ComfyUI does not
know raises ``TypeError``. We pass keywords only, filtered by what the running version
accepts — feature detection, never version parsing.
"""
from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _accepted(target) -> frozenset[str] | None:
    """Keyword names ``target`` accepts; None when it takes ``**kwargs``."""
    if dataclasses.is_dataclass(target):
        return frozenset(f.name for f in dataclasses.fields(target))
    params = inspect.signature(target.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(params) - {"self"}


def build(target, **kwargs):
    """``target(**kwargs)`` minus the keywords this ComfyUI's ``target`` does not know."""
    names = _accepted(target)
    if names is not None:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return target(**kwargs)
