"""Calibration data: named datasets, sampling token windows, and reading them back.

``sample_calibration`` is the `quantize sample` stage; the quantize stages call
``load_calibration(dir, model_dir=...)`` and compare ``tokenizer_hash(model_dir)`` with the
``tokenizer_sha256`` a calibration set was sampled with.
"""

from .sample import (
    CALIBRATION_FILE,
    draw_windows,
    load_calibration,
    sample_calibration,
    load_tokenizer,
    tokenize_corpus,
    tokenizer_files,
    tokenizer_hash,
)
from .sources import Corpus, DatasetIdentity, resolve_dataset

__all__ = [
    "CALIBRATION_FILE",
    "Corpus",
    "DatasetIdentity",
    "draw_windows",
    "load_calibration",
    "load_tokenizer",
    "resolve_dataset",
    "sample_calibration",
    "tokenize_corpus",
    "tokenizer_files",
    "tokenizer_hash",
]
