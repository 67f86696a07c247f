"""Task selectors: which task's router a test image goes to (DDAS, method.md §4; the prototype selector)."""

from moecl.selector.autoencoder import Autoencoder, train_autoencoder
from moecl.selector.base import SELECTORS, TaskSelector, build_selector, load_selector, selector_class
from moecl.selector.ddas import ZERO_SHOT, AutoSelector, confusion_counts, selection_report
from moecl.selector.features import FeatureExtractor, build_feature_extractor
from moecl.selector.prototype import PrototypeSelector

__all__ = [
    "SELECTORS",
    "ZERO_SHOT",
    "AutoSelector",
    "Autoencoder",
    "FeatureExtractor",
    "PrototypeSelector",
    "TaskSelector",
    "build_feature_extractor",
    "build_selector",
    "confusion_counts",
    "load_selector",
    "selection_report",
    "selector_class",
    "train_autoencoder",
]
