"""DDAS: autoencoder-based automatic task selection (method.md §4)."""

from moecl.selector.autoencoder import Autoencoder, train_autoencoder
from moecl.selector.ddas import ZERO_SHOT, AutoSelector, confusion_counts, selection_report
from moecl.selector.features import FeatureExtractor, build_feature_extractor

__all__ = [
    "ZERO_SHOT",
    "AutoSelector",
    "Autoencoder",
    "FeatureExtractor",
    "build_feature_extractor",
    "confusion_counts",
    "selection_report",
    "train_autoencoder",
]
