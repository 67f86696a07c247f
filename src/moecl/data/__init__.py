"""Datasets as ImageDatasets, task streams (MTIL / CIL / custom), prompt templates and class names."""

from moecl.data.folder import BadImageError, DataError, ImageDataset, open_folder_or_zip
from moecl.data.tasks import (
    Task,
    TaskStream,
    build_stream,
    reference_dataset,
    resolve_data_root,
    stream_task_count,
    validate_stream,
)

__all__ = [
    "BadImageError",
    "DataError",
    "ImageDataset",
    "Task",
    "TaskStream",
    "build_stream",
    "open_folder_or_zip",
    "reference_dataset",
    "resolve_data_root",
    "stream_task_count",
    "validate_stream",
]
