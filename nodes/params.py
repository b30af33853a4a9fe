"""Node parameters, each declared once: its type, default, limits and tooltip.

A node's :class:`Params` table is what its V3 schema shows, what its apply function fills
missing options from, and what its validation reads, so a default is written in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from comfy_api.latest import io

from ._schema import build

CATEGORY = "model_patches/token_pruning"
DOWNSAMPLE_CHOICES = ["auto", "1", "2", "4", "8"]

_INPUTS = {"float": "Float", "int": "Int", "boolean": "Boolean", "combo": "Combo", "string": "String"}


@dataclass(frozen=True)
class Param:
    id: str
    type: str  # "float" | "int" | "boolean" | "combo" | "string"
    default: Any
    tooltip: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()
    widget: bool = True  # False: an option of the apply function only (tests, benchmarks), not in the UI

    def schema_input(self):
        kwargs = {"id": self.id, "default": self.default, "tooltip": self.tooltip}
        for name in ("min", "max", "step"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.type == "combo":
            kwargs["options"] = list(self.options)
        if self.type == "string":
            kwargs["multiline"] = False
        if self.id == "seed":
            kwargs["control_after_generate"] = False
        return build(getattr(io, _INPUTS[self.type]).Input, **kwargs)


class Params:
    """A node's parameters in widget order (saved workflows map widget values by position)."""

    def __init__(self, *params: Param):
        self.params = params
        self.defaults = {p.id: p.default for p in params}

    def schema_inputs(self) -> list:
        return [p.schema_input() for p in self.params if p.widget]

    def resolve(self, options: Mapping[str, Any], *, skip_none: bool = False) -> dict[str, Any]:
        """Every parameter's value: the given ones, the defaults for the rest. ``skip_none``: a
        None counts as not given (validation sees only the inputs it asks for)."""
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        given = {k: v for k, v in options.items() if not (skip_none and v is None)}
        return {**self.defaults, **given}


def percent_problem(start_percent: float, end_percent: float) -> str | None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        return f"start_percent ({start_percent}) and end_percent ({end_percent}) must satisfy 0 <= start <= end <= 1"
    return None



def window_and_seed(start_tooltip: str, end_tooltip: str, seed_tooltip: str) -> tuple[Param, Param, Param]:
    """``start_percent``, ``end_percent`` and ``seed``, which every node has (in this order)."""
    return (Param("start_percent", "float", 0.0, start_tooltip, 0.0, 1.0, 0.01),
            Param("end_percent", "float", 1.0, end_tooltip, 0.0, 1.0, 0.01),
            Param("seed", "int", 0, seed_tooltip, 0, 0xFFFFFFFF))
