from __future__ import annotations

import pytest
import torch

from moecl.backbone.cache import PrefixCache, PrefixContext


class Counter:
    """compute() stand-in: the prefix of key k is a deterministic tensor; records which positions were asked."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.calls: list[list[int]] = []

    def __call__(self, positions: list[int]) -> torch.Tensor:
        self.calls.append(list(positions))
        return torch.stack([prefix_of(self.keys[p]) for p in positions])


def prefix_of(key: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, key)) * 31 + len(key))
    return torch.randn(3, 2, 2, generator=g)


def test_only_missing_keys_are_computed_and_batch_matches_uncached():
    cache = PrefixCache()
    first = ["a", "b", "c"]
    c1 = Counter(first)
    out = cache.fetch(first, c1)
    assert c1.calls == [[0, 1, 2]]
    assert torch.equal(out, torch.stack([prefix_of(k) for k in first]))

    second = ["c", "d", "a", "e"]
    c2 = Counter(second)
    out = cache.fetch(second, c2)
    assert c2.calls == [[1, 3]]  # only "d" and "e"
    assert torch.equal(out, torch.stack([prefix_of(k) for k in second]))
    assert (cache.hits, cache.misses) == (2, 5)

    c3 = Counter(second)
    cache.fetch(second, c3)
    assert c3.calls == []  # all cached: compute is not called at all


def test_duplicate_keys_in_a_batch_are_computed_once():
    keys = ["x", "y", "x"]
    counter = Counter(keys)
    out = PrefixCache().fetch(keys, counter)
    assert counter.calls == [[0, 1]]
    assert torch.equal(out[0], out[2])


def test_cached_rows_do_not_alias_the_computed_batch():
    cache = PrefixCache()
    batch = torch.ones(2, 4)
    cache.fetch(["a", "b"], lambda pos: batch[pos])
    batch.zero_()
    assert torch.equal(cache.fetch(["a", "b"], lambda pos: pytest.fail("recomputed")), torch.ones(2, 4))


def test_contexts_do_not_share_entries():
    cache = PrefixCache()
    small = PrefixContext("128:tf:False", '{"backbone": "lite"}', 13)
    large = PrefixContext("224:tf:False", '{"backbone": "lite"}', 13)
    cache.fetch(["img"], lambda pos: torch.zeros(1, 2), context=small)
    counter = Counter(["img"])
    cache.fetch(["img"], counter, context=large)
    assert counter.calls == [[0]]
    assert torch.equal(cache.fetch(["img"], Counter(["img"]), context=small), torch.zeros(1, 2))


def test_max_items_evicts_least_recently_used():
    cache = PrefixCache(max_items=2)
    for k in ["a", "b"]:
        cache.fetch([k], Counter([k]))
    cache.fetch(["a"], Counter(["a"]))  # touch "a": "b" becomes the oldest
    cache.fetch(["c"], Counter(["c"]))
    assert len(cache) == 2
    again_a, again_b = Counter(["a"]), Counter(["b"])
    cache.fetch(["a"], again_a)
    cache.fetch(["b"], again_b)
    assert again_a.calls == [] and again_b.calls == [[0]]


def test_disk_directory_survives_a_new_cache_and_damaged_files_are_recomputed(tmp_path):
    keys = ["p", "q"]
    PrefixCache(directory=tmp_path).fetch(keys, Counter(keys))
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.rglob("*.tmp"))

    warm = Counter(keys)
    out = PrefixCache(directory=tmp_path).fetch(keys, warm)
    assert warm.calls == [] and torch.equal(out, torch.stack([prefix_of(k) for k in keys]))

    files[0].write_bytes(b"not a safetensors file")
    repaired = Counter(keys)
    out = PrefixCache(directory=tmp_path).fetch(keys, repaired)
    assert len(repaired.calls) == 1 and len(repaired.calls[0]) == 1
    assert torch.equal(out, torch.stack([prefix_of(k) for k in keys]))


def test_bad_compute_and_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="max_items"):
        PrefixCache(max_items=0)
    with pytest.raises(ValueError, match="no keys"):
        PrefixCache().fetch([], Counter([]))
    with pytest.raises(ValueError, match="returned 1 rows for 2 positions"):
        PrefixCache().fetch(["a", "b"], lambda pos: torch.zeros(1, 3))


def test_context_of_a_backbone_uses_its_architecture_transform_and_boundary():
    class Fake:
        def architecture(self):
            return {"backbone": "fake", "n": 1}

        def prefix_boundary(self):
            return 7

    class Transform:
        def cache_key(self):
            return "128:tf:False"

    class Wrapper:  # e.g. MoEAdapterModel, which holds the backbone as `.backbone`
        backbone = Fake()

    ctx = PrefixContext.of(Wrapper(), Transform())
    assert ctx == PrefixContext("128:tf:False", '{"backbone": "fake", "n": 1}', 7)
    assert ctx.digest() != PrefixContext("128:tf:False", '{"backbone": "fake", "n": 1}', 8).digest()
