"""Text preparation on the real gensim corpora and the real Debian janeaustenr package."""

from __future__ import annotations

import gzip
import json
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

pytest.importorskip("gensim")

from lmkiln.artifact import sha256_file
from lmkiln.data import texts
from lmkiln.data.texts import (
    fetch_janeausten_deb,
    lee_news_text,
    locate_texts,
    prepare_texts,
    read_rdb_character_vectors,
)
from lmkiln.errors import DataError


@pytest.fixture(scope="module")
def gensim_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return prepare_texts(tmp_path_factory.mktemp("text"), austen=False)


@pytest.fixture(scope="module")
def austen_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Extracted r-cran-janeaustenr: apt-get downloads the .deb, then the cached-.deb path extracts it."""
    download = tmp_path_factory.mktemp("apt")
    try:
        deb = texts._apt_download(download)
    except DataError as e:
        pytest.skip(f"cannot download r-cran-janeaustenr here: {e}")
    deb_dir = tmp_path_factory.mktemp("deb")
    shutil.copy(deb, deb_dir / deb.name)
    real_run = subprocess.run

    def dpkg_only(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        if cmd[0] != "dpkg-deb":
            raise AssertionError(f"only dpkg-deb may run when the .deb is cached, not {cmd[0]}")
        return real_run(cmd, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(texts.subprocess, "run", dpkg_only)
        fetch_janeausten_deb(deb_dir)
    return deb_dir


def test_prepare_writes_files_and_index(gensim_texts: dict[str, Path]) -> None:
    assert sorted(gensim_texts) == ["lee_news", "wiki_sample"]
    out_dir = gensim_texts["lee_news"].parent
    index = json.loads((out_dir / "texts.json").read_text())
    for name, path in gensim_texts.items():
        text = path.read_text(encoding="utf-8")
        assert index[name]["sha256"] == sha256_file(path)
        assert index[name]["chars"] == len(text)
        assert index[name]["source"].startswith("gensim:")
        assert text.endswith("\n") and "\n\n\n" not in text and "  " not in text
    assert locate_texts(out_dir) == gensim_texts
    assert not list(out_dir.glob(".*.tmp"))


def test_lee_news_is_300_articles_and_deterministic(gensim_texts: dict[str, Path]) -> None:
    text = gensim_texts["lee_news"].read_text(encoding="utf-8")
    assert len(text.strip().split("\n\n")) == 300
    assert text.startswith("Hundreds of people have been forced to vacate their homes")
    assert lee_news_text() == text


def test_wiki_sample_is_clean_article_text(gensim_texts: dict[str, Path]) -> None:
    text = gensim_texts["wiki_sample"].read_text(encoding="utf-8")
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert "AccessibleComputing" not in text  # a redirect page
    for markup in ("[[", "]]", "{{", "}}", "'''", "==", "<ref", "File:"):
        assert markup not in text, markup
    assert "\nEtymology and terminology\n" in text  # headings survive as their own lines
    assert len(text) > 2_000_000


def _xdr(kind: int, payload: bytes, attr: bytes = b"") -> bytes:
    return struct.pack(">i", kind | (0x200 if attr else 0)) + payload + attr


def _xdr_str(s: str) -> bytes:
    raw = s.encode()
    return _xdr(9 | (1 << 15), struct.pack(">i", len(raw)) + raw)  # CHARSXP, UTF-8 flag


def _xdr_vec(kind: int, items: list[bytes], names: list[str] | None = None) -> bytes:
    attr = b""
    if names is not None:  # pairlist (names = <STRSXP>) with a symbol tag, then NULL
        sym = _xdr(1, _xdr_str("names"))  # SYMSXP wraps its CHARSXP name
        names_vec = _xdr_vec(16, [_xdr_str(n) for n in names])
        attr = struct.pack(">i", 2 | 0x400) + sym + names_vec + struct.pack(">i", 254)
    return _xdr(kind, struct.pack(">i", len(items)) + b"".join(items), attr)


@pytest.mark.parametrize("compressed", [1, 3])  # TRUE = zlib; 3 = per-block type byte ("X" = xz)
def test_rdb_reader_on_handmade_database(tmp_path: Path, compressed: int) -> None:
    header = b"X\n" + struct.pack(">3i", 2, 0x040201, 0x020300)  # version 2: no encoding name
    books = {"alpha": ["TITLE", "", "First line é"], "beta": ["x"]}
    blob, entries = b"", []
    for lines in books.values():
        raw = header + _xdr_vec(16, [_xdr_str(s) for s in lines])
        body = zlib.compress(raw) if compressed == 1 else b"X" + lzma.compress(raw)
        entries.append(_xdr(13, struct.pack(">3i", 2, len(blob), len(body) + 4)))
        blob += struct.pack(">I", len(header)) + body
    variables = _xdr_vec(19, entries, names=list(books))
    index = _xdr_vec(
        19,
        [variables, _xdr_vec(19, []), _xdr(13, struct.pack(">2i", 1, compressed))],
        names=["variables", "references", "compressed"],
    )
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(header + index))
    assert read_rdb_character_vectors(tmp_path / "Rdata.rdb") == books


def test_rdb_reader_missing_index(tmp_path: Path) -> None:
    (tmp_path / "Rdata.rdb").write_bytes(b"")
    with pytest.raises(DataError, match="missing; extract the R package again"):
        read_rdb_character_vectors(tmp_path / "Rdata.rdb")


def test_apt_failure_says_run_apt_get_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package r-cran-janeaustenr")

    monkeypatch.setattr(texts.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(texts.subprocess, "run", fake_run)
    with pytest.raises(DataError, match="run `apt-get update` first"):
        fetch_janeausten_deb(tmp_path / "deb")
    assert list((tmp_path / "deb").iterdir()) == []  # nothing half-extracted left behind


def test_janeausten_deb_books(austen_deb: Path) -> None:
    books = read_rdb_character_vectors(fetch_janeausten_deb(austen_deb))
    assert set(books) == set(texts.AUSTEN_BOOKS)
    pride = books["prideprejudice"]
    assert pride[0] == "PRIDE AND PREJUDICE"
    assert len(pride) == 13030
    assert "It is a truth universally acknowledged, that a single man in possession" in pride


def test_prepare_with_cached_deb_does_not_call_apt(
    austen_deb: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("apt-get must not run when the deb is already extracted")

    monkeypatch.setattr(texts.subprocess, "run", no_run)
    monkeypatch.setattr(texts, "wiki_sample_text", lambda: "wiki\n")  # keep this test fast
    paths = prepare_texts(tmp_path, deb_dir=austen_deb)
    assert {"pride_and_prejudice", "emma", "persuasion", "lee_news", "wiki_sample"} <= set(paths)
    pride = paths["pride_and_prejudice"].read_text(encoding="utf-8")
    assert pride.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen\n\nChapter 1\n\nIt is a truth")
    index = json.loads((tmp_path / "texts.json").read_text())
    assert index["pride_and_prejudice"]["source"] == "debian:r-cran-janeaustenr"
