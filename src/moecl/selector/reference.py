"""The DDAS reference images a config names (method.md §4): the reference autoencoder trains on them first.

Ours: every split of selector.reference (TinyImageNet: train + val, 110,000 images). The official code's
(protocol "paper"): selector.reference_splits ("train") and, in few-shot runs, selector.reference_shots images
per class (5: 1,000 TinyImageNet images, seeded and stratified like the stream's k-shot sets).
"""

from __future__ import annotations

import os

from moecl.config import SelectorConfig
from moecl.data.folder import ImageDataset
from moecl.data.sampling import limit_per_class, random_subset
from moecl.data.tasks import reference_dataset

SUBSET_SEED = 42  # selector.reference_max_images draws with reference_dataset's seed


def reference_images(sel: SelectorConfig, root: str | os.PathLike | None, seed: int = 42) -> ImageDataset:
    """The reference images of `sel` (sel.reference must be set) under the data `root`; `seed`: the run's, for
    the k-shot draw."""
    ds = reference_dataset(sel.reference, root, None, splits=sel.reference_splits)
    ds = limit_per_class(ds, sel.reference_shots, seed, f"{ds.name}/reference_shots")
    return random_subset(ds, sel.reference_max_images, SUBSET_SEED, ds.name)
