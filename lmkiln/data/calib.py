"""Calibration / evaluation text and token windows.

``load_text`` resolves a source string to one text, always through ``datasets`` and strictly offline:
an LMDeploy dataset name (``ptb``, ``wikitext2``, ``c4``, ``pileval``) found in the local HF cache, a text
prepared by :mod:`lmkiln.data.texts` (``lee_news``, ``pride_and_prejudice``, ...), or a local file/dir.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmkiln.data.texts import AUSTEN_BOOKS, locate_texts
from lmkiln.errors import DataError

log = logging.getLogger(__name__)

DOC_SEP = "\n\n"
PREPARED_NAMES = ("lee_news", "wiki_sample", *sorted(AUSTEN_BOOKS.values()))
LOCAL_SUFFIXES = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")


@dataclass(frozen=True)
class HubDataset:
    """How LMDeploy loads one of its named calibration sets."""

    path: str
    name: str | None
    split: str
    column: str
    data_files: dict[str, str] = field(default_factory=dict)


LMDEPLOY_DATASETS = {
    "ptb": HubDataset("ptb_text_only", "penn_treebank", "train", "sentence"),
    "wikitext2": HubDataset("wikitext", "wikitext-2-raw-v1", "train", "text"),
    "c4": HubDataset(
        "allenai/c4", None, "validation", "text", {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    ),
    "pileval": HubDataset("mit-han-lab/pile-val-backup", None, "validation", "text"),
}


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Force datasets / huggingface_hub offline (env vars and their already-read copies), then restore."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _column_text(ds: Any, column: str, origin: str) -> str:
    if column not in ds.column_names:
        raise DataError(
            f"{origin} has no {column!r} column (columns: {', '.join(ds.column_names)}); "
            f"store the text in a {column!r} field"
        )
    return DOC_SEP.join(t for t in ds[column] if t is not None)


def _load_hub(name: str, split: str | None) -> str:
    import datasets

    spec = LMDEPLOY_DATASETS[name]
    split = split or spec.split
    try:
        with _offline():
            ds = datasets.load_dataset(spec.path, spec.name, split=split, data_files=spec.data_files or None)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"calibration set {name!r} ({spec.path}{'/' + spec.name if spec.name else ''}, split {split!r}) "
            f"is not available offline ({type(e).__name__}: {str(e)[:200]}); either put it in the HF "
            "datasets cache on a machine with hub access (datasets.load_dataset with the same "
            "arguments, then copy ~/.cache/huggingface), or pass a local text instead, e.g. `lee_news` / "
            "resources/text/lee_news.txt, or a .txt/.jsonl/.parquet file or a datasets.save_to_disk dir"
        ) from e
    return _column_text(ds, spec.column, f"dataset {name!r}")


def _load_local(path: Path, split: str | None, column: str) -> str:
    import datasets

    with _offline():
        if path.is_dir():
            if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
                raise DataError(
                    f"{path} is a directory but not one written by datasets.save_to_disk; pass a "
                    ".txt/.jsonl/.parquet file or a saved dataset directory"
                )
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                pick = split or ("train" if "train" in ds else next(iter(ds)))
                if pick not in ds:
                    raise DataError(
                        f"{path} has no split {pick!r} (splits: {', '.join(ds)}); pick one of them"
                    )
                ds = ds[pick]
            return _column_text(ds, column, str(path))
        builder = LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"{path} has an unsupported extension; use one of {', '.join(sorted(LOCAL_SUFFIXES))} "
                "or a datasets.save_to_disk directory"
            )
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except (ValueError, OSError, datasets.exceptions.DatasetGenerationError) as e:
            raise DataError(f"could not read {path} as {builder} ({e}); check the file's format") from e
    return _column_text(ds, column, str(path))


def load_text(
    source: str, text_dir: Path | None = None, split: str | None = None, column: str = "text"
) -> str:
    """Resolve ``source`` (LMDeploy name, prepared text name, or local path) to one text.

    Rows/documents are joined with a blank line. ``split`` overrides the default split of a hub set or
    picks the split of a saved ``DatasetDict``; ``column`` is the text field of local json/parquet data.
    """
    if source in LMDEPLOY_DATASETS:
        text = _load_hub(source, split)
    else:
        prepared = locate_texts(text_dir) if text_dir is not None and Path(text_dir).is_dir() else {}
        path = Path(source).expanduser()
        if source in prepared:
            path = prepared[source]
        elif source in PREPARED_NAMES and not path.exists():
            raise DataError(
                f"{source!r} is a prepared text but "
                + (f"{text_dir} does not hold it" if text_dir else "no text directory was given")
                + "; prepare the texts (`snakemake prepare_texts` or `lmkiln data prepare-texts DIR`) "
                "and pass their directory (resources/text)"
            )
        if not path.exists():
            names = sorted({*LMDEPLOY_DATASETS, *PREPARED_NAMES, *prepared})
            raise DataError(
                f"unknown calibration/eval text {source!r}: not a file or directory either; use one of "
                f"{', '.join(names)}, or a path to a .txt/.jsonl/.json/.parquet file or a "
                "datasets.save_to_disk directory"
            )
        text = _load_local(path, split, column)
    if not text.strip():
        raise DataError(f"the text from {source!r} is empty; pass a source that holds text")
    return text


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    if not text or not text.strip():
        raise DataError("the text is empty; pass a source that holds text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calib_token_windows(
    tokenizer: Any, text: str, n_samples: int, seqlen: int, seed: int, max_context: int | None = None
) -> torch.LongTensor:
    """``[n_samples, seqlen]`` token windows: consecutive non-overlapping windows of the whole text,
    ``n_samples`` of them picked by a seeded permutation, returned in text order."""
    if n_samples < 1 or seqlen < 1:
        raise DataError(
            f"calibration needs at least one sample of at least one token (got --calib-samples {n_samples}, "
            f"--calib-seqlen {seqlen}); pass positive values"
        )
    if max_context is not None and seqlen > max_context:
        raise DataError(
            f"--calib-seqlen {seqlen} is longer than the model's context of {max_context} tokens "
            f"(max_position_embeddings); lower --calib-seqlen to at most {max_context}"
        )
    ids = _encode(tokenizer, text)
    n_windows = ids.numel() // seqlen
    if n_windows < n_samples:
        raise DataError(
            f"the calibration text is too short: need {n_samples * seqlen} tokens ({n_samples} x {seqlen}), "
            f"have {ids.numel()}; lower --calib-samples or --calib-seqlen, or use a longer text"
        )
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=gen)[:n_samples].sort().values
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)[pick]
    log.info("calibration: %d of %d windows of %d tokens (seed %d)", n_samples, n_windows, seqlen, seed)
    return windows.contiguous()


def eval_token_windows(
    tokenizer: Any, text: str, n_tokens: int = 20000, window: int = 512, add_bos: bool = False
) -> torch.LongTensor:
    """The first ``n_tokens`` tokens as non-overlapping ``[n, window]`` rows (ragged tail dropped);
    with ``add_bos`` each row starts with the BOS token (``window + 1`` columns)."""
    if n_tokens < 1 or window < 1:
        raise DataError(f"n_tokens ({n_tokens}) and window ({window}) must be positive; pass positive values")
    ids = _encode(tokenizer, text)[:n_tokens]
    n = ids.numel() // window
    if n < 1:
        raise DataError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window}; "
            "use a longer text or a smaller window"
        )
    rows = ids[: n * window].view(n, window)
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise DataError("add_bos was requested but the tokenizer has no BOS token; pass add_bos=False")
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
    return rows.contiguous()
