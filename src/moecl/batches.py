"""The batch pipeline: images of a dataset -> batches on the learner's device, read by torch DataLoader workers.

A batch is planned in the main process as a `BatchRequest` (which images, the augmentation seed, and which rows
must be decoded because their frozen prefix is not cached yet), read by a worker process (in process with
`data.workers: 0`) into `LoadedImages`, and completed in the main process into a `Batch`: moved to the learner's
placement (from pinned memory on CUDA), the frozen prefix computed for the decoded rows and taken from the prefix
cache for the others (for a backbone whose prefix is the image itself the cache holds the decoded uint8 crops
instead, and the prefix is always computed). Every field of a Batch describes the same rows in the same order (unreadable images in
`on_bad_image: skip` mode are dropped from all of them at once), so nothing computed for one image can be paired
with another.

Determinism: a training batch is a pure function of (seed, task, step). Its indices come from `batch_indices` and
each image's augmentation from its own `random.Random(step_seed * 100_003 + position)`. Workers change who computes
a batch and when, never what: 0 and N workers give identical batches (tested). The DataLoader returns batches in
request order.
"""

from __future__ import annotations

import abc
import contextlib
import math
import os
import random
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from moecl.accel import Collectives
from moecl.data.folder import BadImageError, ImageDataset
from moecl.device import Placement
from moecl.progress import bar as progress_bar

MAX_AUTO_WORKERS = 8


# --------------------------------------------------------------------------------------------------------------
# Batch order and augmentation seeds
# --------------------------------------------------------------------------------------------------------------
def batch_indices(n: int, batch_size: int, seed: int, task_index: int, step: int) -> list[int]:
    """Indices of training batch `step`: seeded per-epoch permutations, so any step can be recomputed on resume."""
    per_epoch = max(1, math.ceil(n / batch_size))
    epoch, pos = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + task_index * 10_007 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    return perm[pos * batch_size : (pos + 1) * batch_size]


def step_seed(seed: int, task_index: int, step: int) -> int:
    """Seed of the augmentation of training batch (task, step); ints only, so stable across processes."""
    return hash((seed, task_index, step))


def evaluation_seed(seed: int, learned: int) -> int:
    """The seed of what is random in evaluation row `learned` (moe.eval_noise, optim.eval_augment): a function of
    the run's seed and the row only, so a re-evaluated or resumed row draws the same (ints: stable across
    processes)."""
    return hash((seed, -1, learned)) % (2**63)


def resolve_workers(setting: int | str, device: torch.device) -> int:
    """`data.workers`: an explicit count, or "auto": a share of the cores this process may use (divided among the
    processes a launcher started on this node). On CUDA the main process mostly waits for the GPU, so all but one
    core decode (at most 8); on the CPU the model's own threads need the cores, so half of them minus one decode
    (0 on a 2-core machine)."""
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if device.type == "cuda":
        return min(MAX_AUTO_WORKERS, per_process - 1)
    return min(MAX_AUTO_WORKERS, max(0, per_process // 2 - 1))


# --------------------------------------------------------------------------------------------------------------
# What travels between the main process and the workers
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchRequest:
    """One batch to read: rows `indices` of reader dataset `source`."""

    source: int
    indices: tuple[int, ...]
    decode: tuple[bool, ...]  # per row; False: its prefix is cached, the worker reads only its key and label
    augment_seed: int | None = None  # training augmentation of this batch (None: the eval transform)
    offset: int = 0  # position of the first row in its global batch (a process's share): seeds its augmentation


@dataclass
class LoadedImages:
    """A worker's answer to a BatchRequest: the readable rows, in request order."""

    source: int
    indices: list[int]  # rows of the source dataset
    keys: list[str]
    labels: torch.Tensor  # (n,) long
    pixels: torch.Tensor | None  # (number of decoded rows, 3, H, W) uint8: the decoded rows, in order
    decoded: list[bool]  # per row: whether its pixels are in `pixels`
    augmented: bool = False  # training augmentation: such prefixes are never cached
    skipped: list[str] = field(default_factory=list)  # keys of unreadable images (on_bad_image: skip)
    error: str | None = None  # an unreadable image in error mode: raised in the main process as one line

    def pin_memory(self) -> LoadedImages:
        """Called by the DataLoader's pinning thread on CUDA (page-locked memory makes the copy asynchronous)."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        return replace(self, labels=self.labels.pin_memory(), pixels=pixels)


class ImageReader(torch.utils.data.Dataset):
    """What a DataLoader worker runs: `reader[request] -> LoadedImages` (the requests are the sampler's items).
    It decodes and crops (ImageTransform.geometry); normalising is left to the main process, on the device."""

    def __init__(self, datasets: Sequence[ImageDataset], eval_transform: Any, train_transform: Any):
        self.datasets = list(datasets)
        self.eval_transform = eval_transform
        self.train_transform = train_transform

    def __len__(self) -> int:  # a sampler of requests drives the loader; the length of the data is not used
        return sum(len(ds) for ds in self.datasets)

    def __getitem__(self, request: BatchRequest) -> LoadedImages:
        ds = self.datasets[request.source]
        indices, keys, labels, pixels, decoded, skipped = [], [], [], [], [], []
        for position, (i, decode) in enumerate(zip(request.indices, request.decode, strict=True)):
            if not decode:
                indices.append(i)
                keys.append(ds.key(i))
                labels.append(ds.labels[i])
                decoded.append(False)
                continue
            try:
                img, label = ds[i]
            except BadImageError as exc:
                return LoadedImages(request.source, [], [], torch.empty(0, dtype=torch.long), None, [], error=str(exc))
            if img is None:  # on_bad_image: skip
                skipped.append(ds.key(i))
                continue
            if request.augment_seed is None:
                pixels.append(self.eval_transform.geometry(img))
            else:
                rng = random.Random(request.augment_seed * 100_003 + request.offset + position)
                pixels.append(self.train_transform.geometry(img, rng))
            indices.append(i)
            keys.append(ds.key(i))
            labels.append(label)
            decoded.append(True)
        stacked = torch.stack(pixels) if pixels else None
        label_tensor = torch.tensor(labels, dtype=torch.long)
        augmented = request.augment_seed is not None
        return LoadedImages(request.source, indices, keys, label_tensor, stacked, decoded, augmented, skipped)


def frozen_prefix(prefix_of: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The frozen prefix of a batch of pixels, in one memory layout (contiguous) whether it was just computed or
    stacked from cached rows: a layout (e.g. the lite backbone's channels-last maps) changes the float rounding of
    the layers after it, so without this a run would depend on what the cache held."""
    with torch.no_grad():
        return prefix_of(pixels).contiguous()


def _as_is(item: LoadedImages) -> LoadedImages:  # collate_fn: requests are already whole batches
    return item


def _worker_init(_worker_id: int) -> None:
    """A worker dies with its main process (a killed run leaves no reader behind holding its pipes)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------------------------------
# Batches as the learner sees them
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    """Rows of one dataset; every field describes the same images in the same order."""

    keys: list[str]  # stable image ids (ImageDataset.key)
    labels: torch.Tensor  # (B,) long: the dataset's local labels
    prefix: torch.Tensor | None = None  # (B, ...) frozen-prefix features: what the learner's model consumes
    pixels: torch.Tensor | None = None  # (B, 3, H, W) transformed pixels, when the pass asked for them
    dataset: int | None = None  # index of the dataset in the stream (None: reference images, predict, ...)

    def __len__(self) -> int:
        return len(self.keys)

    def rows(self, index: slice | torch.Tensor | Sequence[int]) -> Batch:
        """The same batch restricted to `index` (a slice, or row positions)."""
        if isinstance(index, slice):
            keys = self.keys[index]
        else:
            index = torch.as_tensor(index, dtype=torch.long)
            keys = [self.keys[i] for i in index.tolist()]

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t[index] if isinstance(index, slice) else t[index.to(t.device)]

        return Batch(keys, take(self.labels), take(self.prefix), take(self.pixels), self.dataset)


class DataAccess(abc.ABC):
    """What a learner may ask of the engine's data: passes over a dataset with the eval transform, as Batches on
    the learner's placement (e.g. DDAS features of a task's training images). Implemented by BatchPipeline."""

    placement: Placement
    batch_size: int  # rows per batch of `batches`

    @abc.abstractmethod
    def batches(
        self, ds: ImageDataset, *, pixels: bool = False, desc: str | None = None, dataset: int | None = None
    ) -> Iterator[Batch]:
        """One pass over `ds` in order; `pixels`: batches also carry the pixels; `desc`: a progress bar."""

    @abc.abstractmethod
    def groups(
        self,
        ds: ImageDataset,
        groups: Iterable[Sequence[int]],
        *,
        pixels: bool = False,
        desc: str | None = None,
        augment_seeds: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """One eval-transform batch per group of rows of `ds`, in order (a row may be in several groups); a batch
        lacks the unreadable rows of its group (on_bad_image: skip). `augment_seeds` (one per group): the training
        transform instead, each group's augmentation drawn from its seed as a training batch's is. In a
        multi-process launch each process gets its contiguous share of every group: `gather_rows` puts what the
        processes computed from their shares back together, in the group's order."""

    @abc.abstractmethod
    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows computed by every process from its share of a `groups` batch, concatenated in the group's order
        (the identity in a single process). A collective."""


class BatchPipeline(DataAccess):
    """Reads batches for one learner (its transforms and frozen prefix) onto one placement.

    `transforms` are the (eval, train) ImageTransforms of the learner's backbone: workers run their `geometry`,
    this process their `normalize` after the copy to the placement. `prefix_of(pixels)` is the learner's frozen
    prefix; `cache` (a PrefixCache, or None) keeps the prefixes of un-augmented images under `context` (with
    `cache_crops`: their decoded uint8 crops instead); `log` gets
    one "skipped_image" record per unreadable image read in skip mode.
    """

    def __init__(
        self,
        prefix_of: Callable[[torch.Tensor], torch.Tensor],
        transforms: tuple[Any, Any],
        placement: Placement,
        workers: int = 0,
        prefetch: int = 2,
        batch_size: int = 128,
        cache=None,
        context=None,
        log=None,
        quiet: bool = True,
        cache_crops: bool = False,
        collectives: Collectives | None = None,
    ):
        self.prefix_of = prefix_of
        self.eval_transform, self.train_transform = transforms
        self.placement = placement
        self.workers = workers
        self.prefetch = prefetch
        self.batch_size = batch_size  # eval passes
        self.cache = cache
        self.context = context  # PrefixContext of the cache entries
        self.cache_crops = cache_crops  # the cache holds decoded uint8 crops instead of frozen prefixes
        self.collectives = collectives or Collectives()  # this process's share of every batch (multi-process)
        self.decoded = 0  # images this process decoded (multi-process runs report it per process)
        self.log = log
        self.quiet = quiet
        self.skipped = 0

    # -- the passes -------------------------------------------------------------------------------------------
    def training_batches(
        self, ds: ImageDataset, task_index: int, steps: range, batch_size: int, seed: int, augment: bool
    ) -> Iterator[Batch]:
        """One batch per step in `steps`: this process's share of the global batch (the whole batch in a single
        process; an empty Batch when every image of it was unreadable)."""

        def requests() -> Iterator[BatchRequest]:
            for step in steps:
                idx = batch_indices(len(ds), batch_size, seed, task_index, step)
                share = self.collectives.shard(len(idx))
                augment_seed = step_seed(seed, task_index, step) if augment else None
                yield self._request(0, ds, idx[share], augment_seed, False, share.start)

        return self._run([ds], requests(), [task_index], pixels=False)

    def evaluation_batches(
        self,
        datasets: Sequence[tuple[int | None, ImageDataset]],
        pixels: bool = False,
        augment_seed: int | None = None,
    ) -> Iterator[Batch]:
        """Eval-transform batches of every (stream index, dataset) in order, through one set of workers;
        `eval_batch_count(ds)` batches per dataset, each tagged with its stream index (Batch.dataset). In a
        multi-process launch each process gets every N-th batch of each dataset (the others get the rest).
        `augment_seed` (optim.eval_augment): the training transform instead, each batch's augmentation drawn from
        (augment_seed, dataset, first row)."""

        def requests() -> Iterator[BatchRequest]:
            for source, (_, ds) in enumerate(datasets):
                for start in self._own_starts(ds):
                    idx = list(range(start, min(len(ds), start + self.batch_size)))
                    seed = None if augment_seed is None else step_seed(augment_seed, source, start)
                    yield self._request(source, ds, idx, seed, pixels)

        return self._run([ds for _, ds in datasets], requests(), [j for j, _ in datasets], pixels)

    def _own_starts(self, ds: ImageDataset) -> range:
        c = self.collectives
        return range(c.rank * self.batch_size, len(ds), c.world_size * self.batch_size)

    def eval_batch_count(self, ds: ImageDataset) -> int:
        """Batches of `ds` this process evaluates."""
        return len(self._own_starts(ds))

    def batches(
        self, ds: ImageDataset, *, pixels: bool = False, desc: str | None = None, dataset: int | None = None
    ) -> Iterator[Batch]:
        """DataAccess: one eval-transform pass over `ds`, in order (a progress bar when `desc` is given)."""
        bar = progress_bar(len(ds), desc, disable=self.quiet or desc is None)
        with bar:
            for batch in self.evaluation_batches([(dataset, ds)], pixels):
                bar.update(len(batch))
                yield batch

    def groups(
        self,
        ds: ImageDataset,
        groups: Iterable[Sequence[int]],
        *,
        pixels: bool = False,
        desc: str | None = None,
        augment_seeds: Sequence[int] | None = None,
    ) -> Iterator[Batch]:
        """DataAccess: one batch per group of rows, in order (a progress bar when `desc` is given); in a
        multi-process launch, this process's contiguous share of each group."""
        groups = [list(g) for g in groups]
        if augment_seeds is not None and len(augment_seeds) != len(groups):
            raise ValueError(f"{len(augment_seeds)} augmentation seeds for {len(groups)} groups")
        seeds = list(augment_seeds) if augment_seeds is not None else [None] * len(groups)
        bar = progress_bar(sum(map(len, groups)), desc, disable=self.quiet or desc is None)
        shares = ((g, self.collectives.shard(len(g)), seed) for g, seed in zip(groups, seeds, strict=True))
        requests = (self._request(0, ds, g[share], seed, pixels, share.start) for g, share, seed in shares)
        with bar:
            for batch in self._run([ds], requests, [None], pixels):
                bar.update(len(batch) * self.collectives.world_size)
                yield batch

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """DataAccess: every process's rows of a `groups` batch, in the group's order."""
        return self.collectives.gather_rows(rows)

    # -- mechanics --------------------------------------------------------------------------------------------
    def _request(
        self, source: int, ds: ImageDataset, idx: list[int], augment_seed: int | None, pixels: bool, offset: int = 0
    ) -> BatchRequest:
        # Decided when the loader asks for the request (a few batches ahead): rows already cached need no decoding
        # (a cache of crops also serves passes that want pixels, a cache of prefixes does not); augmented rows are
        # never cached.
        if augment_seed is not None or self.cache is None or (pixels and not self.cache_crops):
            decode = (True,) * len(idx)
        else:
            decode = tuple(not self.cache.has(ds.key(i), self.context) for i in idx)
        return BatchRequest(source, tuple(idx), decode, augment_seed, offset)

    def _run(
        self, datasets: list[ImageDataset], requests: Iterable[BatchRequest], tags: list[int | None], pixels: bool
    ) -> Iterator[Batch]:
        reader = ImageReader(datasets, self.eval_transform, self.train_transform)
        workers = self.workers
        loader = torch.utils.data.DataLoader(
            reader,
            sampler=requests,
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=self.prefetch if workers else None,
            pin_memory=self.placement.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
            # its own generator: creating an iterator draws a base seed, which must not move the global RNG that
            # routing noise and dropout use (a resumed run creates its loader at another point than the original)
            generator=torch.Generator().manual_seed(0),
        )
        iterator = iter(loader)
        try:
            for loaded in iterator:
                yield self._complete(loaded, reader, tags[loaded.source], pixels)
        finally:
            del iterator  # shuts the workers down now, also when the consumer stops early (checkpoint + exit)

    def _complete(self, loaded: LoadedImages, reader: ImageReader, tag: int | None, pixels: bool) -> Batch:
        if loaded.error is not None:
            raise BadImageError(loaded.error)
        self.decoded += sum(loaded.decoded) + len(loaded.skipped)
        for key in loaded.skipped:
            self.skipped += 1
            if self.log is not None:
                self.log.write({"event": "skipped_image", "dataset": reader.datasets[loaded.source].name, "key": key})
        labels = self.placement.put(loaded.labels)
        keys = loaded.keys
        if not keys:
            return Batch([], labels, None, None, tag)
        caching = self.cache is not None and not loaded.augmented
        crops = loaded.pixels
        if caching and self.cache_crops:  # the cache holds uint8 crops: complete the batch's crops from it
            if crops is not None:
                self._store([k for k, d in zip(keys, loaded.decoded, strict=True) if d], crops)
            if not all(loaded.decoded):
                crops = self._assemble(loaded, crops, reader, lambda again: again.pixels)
        placed = None
        if crops is not None:  # uint8 crops: normalised after the (4x smaller) copy to the device
            transform = self.train_transform if loaded.augmented else self.eval_transform
            placed = transform.normalize(self.placement.put(crops), self.placement.dtype)
        if caching and self.cache_crops:
            prefix = frozen_prefix(self.prefix_of, placed)
            return Batch(keys, labels, prefix, placed if pixels else None, tag)
        computed = frozen_prefix(self.prefix_of, placed) if placed is not None else None
        if computed is not None and caching:
            self._store([k for k, d in zip(keys, loaded.decoded, strict=True) if d], computed)
        prefix = computed if all(loaded.decoded) else self._assemble(loaded, computed, reader, self._prefix_of_loaded)
        return Batch(keys, labels, prefix, placed if pixels and all(loaded.decoded) else None, tag)

    def _prefix_of_loaded(self, loaded: LoadedImages) -> torch.Tensor:
        pixels = self.eval_transform.normalize(self.placement.put(loaded.pixels), self.placement.dtype)
        return frozen_prefix(self.prefix_of, pixels)

    def _store(self, keys: list[str], rows: torch.Tensor) -> None:
        if self.cache.full():
            return
        for key, row in zip(keys, rows, strict=True):
            # host copies (device memory stays free); a copy, so an entry never keeps its whole batch alive
            self.cache.put(key, row.detach().to("cpu", copy=True), self.context)

    def _assemble(
        self,
        loaded: LoadedImages,
        computed: torch.Tensor | None,
        reader: ImageReader,
        redo: Callable[[LoadedImages], torch.Tensor],
    ) -> torch.Tensor:
        """The rows of a batch that is partly cached (prefixes, or crops): the decoded rows from `computed`, the
        others from the cache; a row evicted since the request was planned is decoded again here (`redo` turns
        the re-read images into cache rows)."""
        fresh = iter(computed) if computed is not None else iter(())
        rows = [
            next(fresh) if decoded else self.cache.get(key, self.context)
            for key, decoded in zip(loaded.keys, loaded.decoded, strict=True)
        ]
        missing = [n for n, row in enumerate(rows) if row is None]
        if missing:
            request = BatchRequest(loaded.source, tuple(loaded.indices[n] for n in missing), (True,) * len(missing))
            again = reader[request]
            self.decoded += len(missing)
            if again.error is not None or len(again.keys) != len(missing):
                raise BadImageError(again.error or f"images of {reader.datasets[loaded.source].name} became unreadable")
            redone = redo(again)
            self._store(again.keys, redone)
            for n, row in zip(missing, redone, strict=True):
                rows[n] = row
        device = rows[0].device if self.cache_crops else self.placement.device
        return torch.stack([row.to(device) for row in rows])
