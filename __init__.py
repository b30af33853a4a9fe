"""Token Pruning & Caching for ComfyUI: SiTo, DaTo and CAT Pruning as model-patch nodes.

ComfyUI loads this file. Import stays cheap (no torch work, no files, no network) and a
failure inside the pack is logged instead of breaking ComfyUI's start-up. Only the V3 entry
point is exported: a module that also exported NODE_CLASS_MAPPINGS would have its V3
extension ignored.
"""
import logging


async def comfy_entrypoint():
    try:
        from .nodes import comfy_entrypoint as entry
        return await entry()
    except Exception:  # noqa: BLE001 - never take ComfyUI down with us
        logging.getLogger("token_pruning_cache").exception("token-pruning-cache failed to load; its nodes are unavailable")
        from comfy_api.latest import ComfyExtension

        class _Empty(ComfyExtension):
            async def get_node_list(self):
                return []
        return _Empty()
