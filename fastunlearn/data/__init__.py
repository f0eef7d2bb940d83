"""Data below training and evaluation: records, their sources and formats (:mod:`.records`), prompt
templates, tokenisation, batches and refusals (:mod:`.examples`), TOFU's files and tokenisation
(:mod:`.tofu_format`)."""

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
