"""Data below training and evaluation: records and their formats (:mod:`.records`), prompt templates,
tokenisation and batches (:mod:`.examples`), TOFU's own tokenisation (:mod:`.tofu_format`) and files
(:mod:`.tofu_files`)."""

from fastunlearn.data.examples import (
    IGNORE_INDEX,
    TEMPLATE_NAMES,
    TEMPLATES,
    Example,
    PairCollator,
    PairedDataset,
    batches,
    collate,
    pad_id_of,
    prepare,
    tokenize_records,
)
from fastunlearn.data.records import FORMATS, DataFormat, detect_format, load_records

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "TEMPLATES",
    "TEMPLATE_NAMES",
    "DataFormat",
    "Example",
    "PairCollator",
    "PairedDataset",
    "batches",
    "collate",
    "detect_format",
    "load_records",
    "pad_id_of",
    "prepare",
    "tokenize_records",
]
