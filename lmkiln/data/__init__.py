"""Text corpora and token windows for calibration and evaluation."""

from lmkiln.data.calib import calib_token_windows, eval_token_windows, load_text
from lmkiln.data.texts import locate_texts, prepare_texts, read_rdb_character_vectors

__all__ = [
    "calib_token_windows",
    "eval_token_windows",
    "load_text",
    "locate_texts",
    "prepare_texts",
    "read_rdb_character_vectors",
]
