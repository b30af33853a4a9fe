"""The one package that touches ComfyUI internals, through its public patch API only
(``ModelPatcher.clone()``, attention patch pairs, keyed wrappers, object patches, DiT block
replace, attachments). One module per question:

- :mod:`.patching`      registration: the only calls that hand our functions to a ModelPatcher
- :mod:`.run`           the run lifecycle: ``RunState`` per sampling run, records for the preview
- :mod:`.calls`         what a hook knows about its model call; ``CallSlot`` call contexts
- :mod:`.model_info`    model inspection: UNet levels and block paths, DiT families
- :mod:`.block_pruning` SiTo/DaTo token pruning inside UNet transformer blocks
- :mod:`.dato_cache`    DaTo's step cache: full / shallow / reused steps, ``DaToRun``
- :mod:`.cat_step`      CAT's step wrapper: selections, noise-space reuse, ``CATRun``
- :mod:`.cat_unet`      CAT inside UNet transformer blocks (K/V, attention and FF caches)
- :mod:`.cat_dit`       CAT inside DiT blocks (SD3, Flux)

Imports of ``comfy`` happen inside functions: importing the pack must stay cheap and must never
break ComfyUI start-up.
"""
from .block_pruning import BlockCall, BlockPruning, install_block_pruning
from .cat_step import PREDICTION_SPACES as CAT_PREDICTION_SPACES, CATRun, cat_role, full_step_count, install_cat
from .dato_cache import DaToRun, current_dynamics, install_step_cache
from .model_info import (attention_levels, dit_family, max_cache_depth, model_class_name,
                         resolve_max_downsample)
from .run import RunState, install_run_lifecycle, last_records, new_uid

__all__ = ["BlockCall", "BlockPruning", "install_block_pruning", "CAT_PREDICTION_SPACES", "CATRun", "cat_role",
           "full_step_count", "install_cat", "DaToRun", "current_dynamics", "install_step_cache", "attention_levels", "dit_family",
           "max_cache_depth", "model_class_name", "resolve_max_downsample", "RunState",
           "install_run_lifecycle", "last_records", "new_uid"]
