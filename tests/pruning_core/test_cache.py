"""FeatureCache: keyed by (chunk, slot), checked reads, clearing."""
import uuid

import torch

from token_pruning_cache.pruning_core.cache import FeatureCache, chunk_key

COND, UNCOND = uuid.uuid4(), uuid.uuid4()


def test_chunk_key():
    assert chunk_key([COND, UNCOND]) == (str(COND), str(UNCOND))
    assert chunk_key([UNCOND, COND]) != chunk_key([COND, UNCOND])
    assert chunk_key(None) == ()
    assert hash(chunk_key([COND]))


def test_put_get_by_chunk_and_slot():
    cache = FeatureCache()
    both, cond = chunk_key([COND, UNCOND]), chunk_key([COND])
    a, b, c = torch.zeros(2, 4), torch.ones(2, 4), torch.full((1, 4), 2.0)
    cache.put(both, "eps", a)
    cache.put(both, "deep:output_blocks.1", b)
    cache.put(cond, "eps", c)
    assert cache.get(both, "eps") is a
    assert cache.get(both, "deep:output_blocks.1") is b
    assert cache.get(cond, "eps") is c
    assert cache.get(cond, "deep:output_blocks.1") is None
    assert cache.get(chunk_key([UNCOND]), "eps") is None
    assert len(cache) == 3 and (both, "eps") in cache
    cache.put(both, "eps", b)  # overwrite
    assert cache.get(both, "eps") is b and len(cache) == 3


def test_mismatched_reads_return_none():
    cache = FeatureCache()
    k = chunk_key([COND, UNCOND])
    x = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    cache.put(k, "eps", x)
    assert cache.get(k, "eps", shape=(2, 4, 8, 8), dtype=torch.float16, device="cpu") is x
    assert cache.get(k, "eps", shape=torch.Size([2, 4, 8, 8])) is x
    assert cache.get(k, "eps", shape=(1, 4, 8, 8)) is None  # smaller last batch
    assert cache.get(k, "eps", shape=(2, 4, 8, 9)) is None  # another resolution
    assert cache.get(k, "eps", dtype=torch.float32) is None
    assert cache.get(k, "eps", device="meta") is None
    assert cache.get_like(k, "eps", torch.empty_like(x)) is x
    assert cache.get_like(k, "eps", torch.empty(2, 4, 8, 8)) is None


def test_drop_and_clear():
    cache = FeatureCache()
    k1, k2 = chunk_key([COND]), chunk_key([UNCOND])
    for k in (k1, k2):
        cache.put(k, "eps", torch.zeros(1))
        cache.put(k, "deep:middle_block", torch.zeros(3))
    assert cache.nbytes() == 2 * (4 + 12)
    cache.drop(k1, "eps")
    assert cache.get(k1, "eps") is None and cache.get(k1, "deep:middle_block") is not None
    cache.drop(k1)
    assert cache.get(k1, "deep:middle_block") is None and len(cache) == 2
    cache.drop(k1, "missing")  # no error
    cache.clear()
    assert len(cache) == 0 and cache.get(k2, "eps") is None
