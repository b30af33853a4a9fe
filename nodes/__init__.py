"""ComfyUI side of the pack: thin V3 nodes, their parameter tables (``params.py``) and the one package that touches ComfyUI internals (``hooks/``)."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class TokenPruningExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .cat_node import CATPruneCache
        from .dato_node import DaToPruneCache
        from .preview_node import TokenPruningPreview
        from .sito_node import SiToTokenPruning
        return [SiToTokenPruning, DaToPruneCache, CATPruneCache, TokenPruningPreview]


async def comfy_entrypoint() -> TokenPruningExtension:
    return TokenPruningExtension()
