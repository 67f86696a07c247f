"""PrefixCache: frozen-prefix outputs (layers before the first MoE site) computed once per image and reused.

The image layers before the first adapter never change, so their output for an un-augmented image is a pure
function of (image, eval transform, backbone weights, boundary block). A cache entry is keyed by the image key plus a
`PrefixContext` naming the other three, so one cache (or one disk directory) can serve several backbones or image
sizes without mixing them up. A backbone whose prefix is little more than the image (CLIP with an adapter in block 0:
the "prefix" is the fp32 patch embedding, 605 KB at 224 px) is better served by caching the decoded uint8 crop
(150 KB), which saves what is expensive there, the decoding: `PrefixContext.crops` names such entries.

Memory is a dict, bounded by `max_bytes` (entries past the budget are not admitted: for the cyclic scans of
evaluation this keeps a fixed share of images cached, where an LRU would evict every entry before its reuse) or
LRU-bounded by `max_items`; an optional directory keeps one safetensors file per entry, written atomically, so later
runs start warm.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moecl.backbone.base import Backbone

_TENSOR = "prefix"


@dataclass(frozen=True)
class PrefixContext:
    """Everything besides the image that a prefix depends on."""

    transform: str = ""  # ImageTransform.cache_key() of the (deterministic, eval) transform
    fingerprint: str = ""  # the backbone's architecture() as canonical JSON
    boundary: int | None = None  # first block NOT in the prefix (None: the backbone does not say)

    @classmethod
    def of(cls, backbone: Any, transform: Any) -> PrefixContext:
        """Context of `backbone` (a Backbone, or a model wrapping one as `.backbone`) and its eval `transform`."""
        inner = backbone if isinstance(backbone, Backbone) else backbone.backbone
        boundary = inner.prefix_boundary()
        key = transform.cache_key() if hasattr(transform, "cache_key") else repr(transform)
        return cls(key, json.dumps(inner.architecture(), sort_keys=True), boundary)

    @classmethod
    def crops(cls, transform: Any) -> PrefixContext:
        """Context of decoded, eval-transformed uint8 crops (independent of the backbone)."""
        return cls(transform.cache_key(), "uint8-crops", None)

    def digest(self) -> str:
        return _digest(self)  # asked once per image by the batch pipeline: computed once per context


class PrefixCache:
    """Maps (image key, context) -> prefix tensor of one image.

    `fetch(keys, compute)` returns the stacked prefixes of `keys`; only keys found neither in memory nor on disk are
    computed, by `compute(positions)` which receives their positions in `keys` (each distinct key once) and returns
    their prefixes stacked in that order.
    """

    def __init__(
        self, max_items: int | None = None, directory: str | os.PathLike | None = None, max_bytes: int | None = None
    ):
        if max_items is not None and max_items < 1:
            raise ValueError(f"PrefixCache: max_items must be at least 1 (or None for unbounded), got {max_items}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"PrefixCache: max_bytes must not be negative (or None for unbounded), got {max_bytes}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.nbytes = 0  # held in memory
        self.refused = 0  # entries not admitted: the byte budget was full
        self.directory = Path(directory) if directory is not None else None
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0  # served from memory or disk
        self.misses = 0  # computed

    def __len__(self) -> int:
        return len(self._memory)

    def clear(self) -> None:
        """Forget the in-memory entries (files on disk stay)."""
        self._memory.clear()
        self.nbytes = 0

    def fetch(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        context: PrefixContext | None = None,
    ) -> torch.Tensor:
        if not keys:
            raise ValueError("PrefixCache.fetch: no keys given")
        scope = (context or PrefixContext()).digest()
        full = [_entry_name(scope, str(k)) for k in keys]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}  # entry -> first position asking for it
        for pos, entry in enumerate(full):
            if entry in found or entry in missing:
                continue
            tensor = self._lookup(entry)
            if tensor is None:
                missing[entry] = pos
            else:
                found[entry] = tensor
        self.hits += len(found)
        if missing:
            positions = list(missing.values())
            computed = compute(positions)
            if computed.shape[0] != len(positions):
                raise ValueError(
                    f"PrefixCache.fetch: compute() returned {computed.shape[0]} rows for {len(positions)} positions"
                )
            self.misses += len(positions)
            for entry, row in zip(missing, computed, strict=True):
                # clone: a cached row must not keep the whole computed batch alive
                tensor = row.detach().clone()
                self._store(entry, tensor)
                found[entry] = tensor
        rows = [found[e] for e in full]
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) != 1:
            raise ValueError(
                f"PrefixCache.fetch: cached prefixes of different shapes {sorted(shapes)} in one batch; pass a "
                "PrefixContext that names the transform and backbone so different setups do not share entries"
            )
        return torch.stack(rows)

    # one entry at a time (the batch pipeline) ---------------------------------------------------------------------
    def full(self) -> bool:
        """Whether the byte budget admits nothing more (callers may skip preparing entries)."""
        return self.max_bytes is not None and self.directory is None and self.nbytes >= self.max_bytes

    def has(self, key: str, context: PrefixContext | None = None) -> bool:
        """Whether `key` is cached (in memory or on disk); counts as neither hit nor miss."""
        entry = _entry(key, context)
        return entry in self._memory or (self.directory is not None and self._path(entry).is_file())

    def get(self, key: str, context: PrefixContext | None = None) -> torch.Tensor | None:
        """The cached prefix of `key`, or None (evicted, or never stored)."""
        tensor = self._lookup(_entry(key, context))
        if tensor is not None:
            self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor, context: PrefixContext | None = None) -> None:
        """Store the prefix of one image (kept as given: pass a host copy to keep device memory free)."""
        self.misses += 1
        self._store(_entry(key, context), tensor)

    # storage --------------------------------------------------------------------------------------------------------
    def _lookup(self, entry: str) -> torch.Tensor | None:
        tensor = self._memory.get(entry)
        if tensor is not None:
            self._memory.move_to_end(entry)
            return tensor
        if self.directory is None:
            return None
        tensor = _read(self._path(entry))
        if tensor is not None:
            self._remember(entry, tensor)
        return tensor

    def _store(self, entry: str, tensor: torch.Tensor) -> None:
        self._remember(entry, tensor)
        if self.directory is not None:
            _write(self._path(entry), tensor)

    def _remember(self, entry: str, tensor: torch.Tensor) -> None:
        old = self._memory.get(entry)
        size = tensor.nbytes - (old.nbytes if old is not None else 0)
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            self.refused += 1
            return
        self._memory[entry] = tensor
        self._memory.move_to_end(entry)
        self.nbytes += size
        if self.max_items is not None:
            while len(self._memory) > self.max_items:
                self.nbytes -= self._memory.popitem(last=False)[1].nbytes

    def _path(self, entry: str) -> Path:
        assert self.directory is not None
        return self.directory / entry[:2] / f"{entry}.safetensors"


@functools.lru_cache(maxsize=16)
def _digest(context: PrefixContext) -> str:
    text = json.dumps([context.transform, context.fingerprint, context.boundary])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _entry(key: str, context: PrefixContext | None) -> str:
    return _entry_name((context or PrefixContext()).digest(), str(key))


def _entry_name(scope: str, key: str) -> str:
    return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()


def _read(path: Path) -> torch.Tensor | None:
    """The stored tensor, or None when absent or unreadable (a damaged file is recomputed and rewritten)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))[_TENSOR]
    except (SafetensorError, KeyError, OSError):
        return None


def _write(path: Path, tensor: torch.Tensor) -> None:
    from moecl.checkpoint import save_tensors

    save_tensors(path, {_TENSOR: tensor})  # atomic: a reader never sees a half-written entry
