"""Text loading through ``datasets`` and token windows with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmkiln.data.calib import calib_token_windows, eval_token_windows, load_text
from lmkiln.errors import DataError


@pytest.fixture(scope="module")
def lee_text() -> str:
    pytest.importorskip("gensim")
    from lmkiln.data.texts import lee_news_text

    return lee_news_text()


@pytest.fixture(scope="module")
def lee_ids(smollm2_tokenizer, lee_text: str) -> torch.Tensor:
    return torch.tensor(smollm2_tokenizer(lee_text, add_special_tokens=False)["input_ids"])


# --- load_text ----------------------------------------------------------------------------------------


def test_load_txt_jsonl_json_parquet(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "a.txt").write_text("line one\nline two\n\nsecond paragraph\n", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "line one\nline two\n\nsecond paragraph\n"
    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_text(str(tmp_path / "b.jsonl")) == "first doc\n\nsecond doc"
    (tmp_path / "c.json").write_text(json.dumps(rows), encoding="utf-8")
    assert load_text(str(tmp_path / "c.json")) == "first doc\n\nsecond doc"
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_text(str(tmp_path / "d.parquet")) == "first doc\n\nsecond doc"


def test_load_saved_dataset_dirs(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"]})
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_text(str(tmp_path / "one")) == "alpha\n\nbeta"
    test = datasets.Dataset.from_dict({"text": ["gamma"]})
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "dict"))
    assert load_text(str(tmp_path / "dict")) == "alpha\n\nbeta"
    assert load_text(str(tmp_path / "dict"), split="test") == "gamma"
    with pytest.raises(DataError, match="no split 'val'"):
        load_text(str(tmp_path / "dict"), split="val")


def test_load_prepared_name(tmp_path: Path) -> None:
    (tmp_path / "lee_news.txt").write_text("some news\n", encoding="utf-8")
    assert load_text("lee_news", text_dir=tmp_path) == "some news\n"
    with pytest.raises(DataError, match="prepared text but no text directory was given"):
        load_text("pride_and_prejudice")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown calibration/eval text 'nope'.*lee_news.*ptb.*wikitext2"):
        load_text("nope")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported extension"):
        load_text(str(tmp_path / "x.csv"))
    (tmp_path / "q.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"no 'text' column.*body"):
        load_text(str(tmp_path / "q.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(DataError, match=r"not one written by datasets\.save_to_disk"):
        load_text(str(tmp_path / "plain_dir"))


def test_ptb_offline_error_explains_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache, whatever this machine holds
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(DataError, match=r"'ptb'.*not available offline.*HF datasets cache.*lee_news"):
        load_text("ptb")
    assert "HF_HUB_OFFLINE" not in os.environ  # the offline switch is restored afterwards


# --- calibration windows ------------------------------------------------------------------------------


def test_calib_windows_are_seeded_ordered_slices(smollm2_tokenizer, lee_text: str, lee_ids) -> None:
    w = calib_token_windows(smollm2_tokenizer, lee_text, n_samples=16, seqlen=128, seed=0, max_context=8192)
    assert w.shape == (16, 128) and w.dtype == torch.long
    assert torch.equal(w, calib_token_windows(smollm2_tokenizer, lee_text, 16, 128, seed=0))
    assert not torch.equal(w, calib_token_windows(smollm2_tokenizer, lee_text, 16, 128, seed=1))
    grid = lee_ids[: (lee_ids.numel() // 128) * 128].view(-1, 128)
    rows = [next(i for i in range(len(grid)) if torch.equal(grid[i], row)) for row in w]
    assert rows == sorted(rows) and len(set(rows)) == 16  # distinct windows, in text order


def test_calib_windows_no_special_tokens(smollm2_tokenizer) -> None:
    text = "word " * 300
    w = calib_token_windows(smollm2_tokenizer, text, n_samples=2, seqlen=64, seed=0)
    specials = set(smollm2_tokenizer.all_special_ids)
    assert not specials & set(w.flatten().tolist())


def test_calib_window_errors(smollm2_tokenizer, lee_text: str, lee_ids) -> None:
    with pytest.raises(DataError, match=r"longer than the model's context of 8192.*at most 8192"):
        calib_token_windows(smollm2_tokenizer, lee_text, 1, 9000, seed=0, max_context=8192)
    n = lee_ids.numel()
    with pytest.raises(DataError, match=rf"need {1000 * 512} tokens .*have {n}; lower --calib-samples"):
        calib_token_windows(smollm2_tokenizer, lee_text, 1000, 512, seed=0)
    with pytest.raises(DataError, match="pass positive values"):
        calib_token_windows(smollm2_tokenizer, lee_text, 0, 512, seed=0)
    with pytest.raises(DataError, match="empty"):
        calib_token_windows(smollm2_tokenizer, "", 1, 8, seed=0)


# --- evaluation windows -------------------------------------------------------------------------------


def test_eval_windows(smollm2_tokenizer, lee_text: str, lee_ids) -> None:
    w = eval_token_windows(smollm2_tokenizer, lee_text, n_tokens=2000, window=512)
    assert w.shape == (3, 512)  # 2000 // 512, the ragged tail dropped
    assert torch.equal(w.flatten(), lee_ids[: 3 * 512])
    b = eval_token_windows(smollm2_tokenizer, lee_text, n_tokens=2000, window=512, add_bos=True)
    assert b.shape == (3, 513)
    assert (b[:, 0] == smollm2_tokenizer.bos_token_id).all() and torch.equal(b[:, 1:], w)
    with pytest.raises(DataError, match="fewer than one window of 512"):
        eval_token_windows(smollm2_tokenizer, "just a few words", window=512)
