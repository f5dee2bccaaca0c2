"""Offline data: dataset loaders, partitions among models, fusion sets, augmentation and inputs
synthesised from trained models (:mod:`neurofuse.data.inversion`).

Importing this package registers the built-in datasets (``mnist5k``, ``mnist1d``,
``synthetic``, ``cifar10``, ``cifar100``, ``npz``); none of them downloads anything.
"""

from neurofuse.data import bundled, local_files  # noqa: F401  (registers the loaders)
from neurofuse.data.augment import Augment, augmented_copies, cutmix, random_crop, random_flip
from neurofuse.data.bundled import make_synthetic
from neurofuse.data.datasets import (
    DataSplits,
    available_datasets,
    channel_stats,
    load,
    make_splits,
    register_dataset,
)
from neurofuse.data.inversion import missing_classes, synthesise
from neurofuse.data.local_files import load_fusion_file
from neurofuse.data.partition import (
    PARTITION_SCHEMES,
    Partition,
    fusion_indices,
    partition,
    stratified_split,
)
from neurofuse.data.safe_pickle import UnsafePickleError, safe_load_pickle

__all__ = [
    "PARTITION_SCHEMES",
    "Augment",
    "augmented_copies",
    "DataSplits",
    "Partition",
    "UnsafePickleError",
    "available_datasets",
    "channel_stats",
    "cutmix",
    "fusion_indices",
    "load_fusion_file",
    "load",
    "make_splits",
    "make_synthetic",
    "missing_classes",
    "partition",
    "random_crop",
    "random_flip",
    "register_dataset",
    "safe_load_pickle",
    "stratified_split",
    "synthesise",
]
