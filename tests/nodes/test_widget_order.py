"""Saved workflows map a node's widget values by *position*: a new input inserted in the middle
shifts every value after it in every workflow users have saved (a CAT graph would load
``max_downsample=6``, ``num_clusters=0.25``...). This pins the order of the inputs each node
shipped with; new inputs may only be appended after them."""
from __future__ import annotations

import pytest

from token_pruning_cache.nodes.cat_node import CATPruneCache
from token_pruning_cache.nodes.dato_node import DaToPruneCache
from token_pruning_cache.nodes.preview_node import TokenPruningPreview
from token_pruning_cache.nodes.sito_node import SiToTokenPruning

# The widget inputs the first shared workflows were saved with, in order (MODEL is a socket).
RELEASED = {
    SiToTokenPruning: ["prune_ratio", "max_downsample", "prune_self_attn", "prune_cross_attn", "prune_mlp",
                       "prune_kv", "sx", "sy", "noise_alpha", "sim_beta", "similarity_search", "start_percent",
                       "end_percent", "seed"],
    DaToPruneCache: ["prune_ratio", "schedule", "custom_schedule", "cache_depth", "max_downsample",
                     "dynamics_weight", "noise_alpha", "align_cfg", "sign_flip", "start_percent", "end_percent",
                     "seed"],
    CATPruneCache: ["keep_ratio", "warmup_steps", "num_clusters", "cluster_share", "staleness_decay",
                    "start_percent", "end_percent", "seed"],
}


@pytest.mark.parametrize("node", list(RELEASED), ids=lambda n: n.__name__)
def test_released_widget_order_is_kept(node):
    ids = [i.id for i in node.define_schema().inputs if i.id != "model"]
    released = RELEASED[node]
    assert ids[: len(released)] == released, f"{node.__name__}: inputs {ids} do not start with {released}"


def test_preview_node_schema_builds():
    assert TokenPruningPreview.define_schema().node_id == "TokenPruningPreview"
