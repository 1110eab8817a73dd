"""Prepare the plain-text corpora used for calibration and evaluation (``resources/text/``).

Sources, all reachable without a model or dataset hub:

* ``lee_news``: the Lee news corpus shipped in gensim's test data (300 short news articles);
* ``wiki_sample``: a shortened English Wikipedia dump from gensim's test data, markup stripped;
* the six Jane Austen novels (``pride_and_prejudice``, ``emma``, ...) from Debian's
  ``r-cran-janeaustenr``, read straight from its R lazy-load database without R.

Every file is written atomically and described (source, sha256, characters) in ``texts.json``.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lmkiln.artifact import sha256_file, write_json_atomic, write_text_atomic
from lmkiln.errors import DataError

log = logging.getLogger(__name__)

INDEX = "texts.json"
DEB_PACKAGE = "r-cran-janeaustenr"
RDB_DIR = "usr/lib/R/site-library/janeaustenr/data"
LEE_FILE = "test/test_data/lee_background.cor"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# R object name in janeaustenr -> our file stem.
AUSTEN_BOOKS = {
    "prideprejudice": "pride_and_prejudice",
    "sensesensibility": "sense_and_sensibility",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


# --- R serialization (XDR) reader: just enough for character vectors and named lists -----------------


def _r_read(f: BinaryIO, refs: list[Any]) -> Any:
    """One R object from an XDR stream; named vectors become dicts, NULL becomes None."""
    (flags,) = struct.unpack(">i", f.read(4))
    kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
    if kind == 254:  # NILVALUE_SXP
        return None
    if kind == 255:  # REFSXP
        idx = flags >> 8 or struct.unpack(">i", f.read(4))[0]
        return refs[idx - 1]
    if kind == 1:  # SYMSXP: its name, remembered for later references
        refs.append(_r_read(f, refs))
        return refs[-1]
    if kind == 2:  # LISTSXP (pairlist, used for attributes): list of (tag, value)
        if has_attr:
            _r_read(f, refs)
        tag = _r_read(f, refs) if has_tag else None
        return [(tag, _r_read(f, refs)), *(_r_read(f, refs) or [])]
    (n,) = struct.unpack(">i", f.read(4))
    if kind == 9:  # CHARSXP; LATIN1 flag is bit 2 of the levels (flags >> 12)
        return None if n == -1 else f.read(n).decode("latin-1" if flags & (1 << 14) else "utf-8")
    if kind in (10, 13):  # LGLSXP, INTSXP
        value: Any = list(struct.unpack(f">{n}i", f.read(4 * n)))
    elif kind == 14:  # REALSXP
        value = list(struct.unpack(f">{n}d", f.read(8 * n)))
    elif kind in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
        value = [_r_read(f, refs) for _ in range(n)]
    else:
        raise DataError(
            f"unsupported R object type {kind} in serialized data; only vectors and lists are read"
        )
    attrs = dict(_r_read(f, refs)) if has_attr else {}
    return dict(zip(attrs["names"], value, strict=True)) if "names" in attrs else value


def _r_unserialize(data: bytes) -> Any:
    import io

    f = io.BytesIO(data)
    if f.read(2) != b"X\n":
        raise DataError(
            "not an R XDR serialization (expected 'X\\n'); the R package data is in another format"
        )
    version = struct.unpack(">3i", f.read(12))[0]
    if version == 3:
        f.read(struct.unpack(">i", f.read(4))[0])  # native encoding name
    return _r_read(f, [])


def read_rdb_character_vectors(rdb_path: Path) -> dict[str, list[str]]:
    """Character vectors stored in an R lazy-load database (``Rdata.rdb`` + its ``.rdx`` index)."""
    rdb_path = Path(rdb_path)
    rdx_path = rdb_path.with_suffix(".rdx")
    if not rdb_path.is_file() or not rdx_path.is_file():
        raise DataError(f"{rdb_path} or {rdx_path.name} is missing; extract the R package again")
    raw = rdx_path.read_bytes()
    index = _r_unserialize(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:]))
    blob = rdb_path.read_bytes()
    compressed = (index.get("compressed") or [1])[0]
    out = {}
    for name, (offset, length) in index["variables"].items():
        block = blob[offset + 4 : offset + length]  # after the 4-byte uncompressed length
        if compressed in (2, 3):  # R >= 2.10 "bzip2"/"xz" databases: one type byte first
            codec = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
            block = codec[block[:1]](block[1:])
        else:
            block = zlib.decompress(block)
        value = _r_unserialize(block)
        if isinstance(value, list) and all(v is None or isinstance(v, str) for v in value):
            out[name] = ["" if v is None else v for v in value]
    return out


# --- sources ------------------------------------------------------------------------------------------


def _gensim_file(rel: str) -> Path:
    try:
        import gensim
    except ImportError as e:
        raise DataError("gensim is not installed; install it with `pip install gensim`") from e
    path = Path(gensim.__file__).parent / rel
    if not path.is_file():
        raise DataError(f"{path} is missing from the gensim install; reinstall it (`pip install -U gensim`)")
    return path


def _normalize(text: str) -> str:
    """Strip trailing spaces, squeeze runs of spaces, keep paragraph breaks (at most one blank line)."""
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def lee_news_text() -> str:
    """The Lee background corpus: one article per line, written as paragraphs."""
    lines = _gensim_file(LEE_FILE).read_text(encoding="utf-8").splitlines()
    return _normalize("\n\n".join(line for line in lines if line.strip()))


def _wiki_pages(path: Path) -> Iterator[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    with bz2.open(path) as f:
        for _, el in ET.iterparse(f):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            if el.findtext("{*}ns") == "0" and el.find("{*}redirect") is None:
                yield el.findtext("{*}title") or "", el.findtext("{*}revision/{*}text") or ""
            el.clear()


def wiki_sample_text() -> str:
    """Articles (no redirects, main namespace) of gensim's shortened Wikipedia dump, as plain text."""
    from gensim.corpora.wikicorpus import filter_wiki

    articles = []
    for title, markup in _wiki_pages(_gensim_file(WIKI_FILE)):
        text = filter_wiki(markup)
        text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
        text = re.sub(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", r"\n\2\n", text, flags=re.M)  # == H == -> H
        text = re.sub(r"^(?:File|Image):.*$", "", text, flags=re.M)  # gallery entries
        text = re.sub(r"\|alt=.*$", "", text, flags=re.M)  # image alt text after a caption
        text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left by removed templates
        text = _normalize(text)
        if len(text) > 200:
            articles.append(f"{title}\n\n{text}")
    return _normalize("\n\n".join(articles))


def _apt_download(tmp: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise DataError(
            f"apt-get is not available, so {DEB_PACKAGE} cannot be downloaded; fetch the .deb (or its "
            "extracted tree) on a Debian/Ubuntu machine and pass its directory with --deb-dir"
        )
    res = subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, capture_output=True, text=True)
    debs = sorted(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
    if res.returncode != 0 or not debs:
        err = res.stderr.strip()
        hint = (
            "the package lists are missing or stale: run `apt-get update` first"
            if any(s in err for s in ("Unable to locate", "no installation candidate", "Can't select"))
            else "check network access to the Debian mirror, or pass an extracted copy with --deb-dir"
        )
        raise DataError(f"`apt-get download {DEB_PACKAGE}` failed ({err[-300:]}); {hint}")
    return debs[0]


def fetch_janeausten_deb(dest_dir: Path) -> Path:
    """Path of janeaustenr's ``Rdata.rdb`` under ``dest_dir``, extracting it first when needed.

    ``dest_dir`` may already hold the extracted tree (nothing runs) or a downloaded
    ``r-cran-janeaustenr_*.deb`` (only ``dpkg-deb -x`` runs); otherwise ``apt-get download`` fetches it.
    """
    dest_dir = Path(dest_dir)
    rdb = dest_dir / RDB_DIR / "Rdata.rdb"
    if rdb.is_file():
        return rdb
    if shutil.which("dpkg-deb") is None:
        raise DataError(
            f"dpkg-deb is not available, so {DEB_PACKAGE} cannot be extracted; extract it on a Debian/Ubuntu "
            "machine and pass the extracted directory with --deb-dir"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".janeausten.", dir=dest_dir) as tmp:
        cached = sorted(dest_dir.glob(f"{DEB_PACKAGE}_*.deb"))
        deb = cached[-1] if cached else _apt_download(Path(tmp))
        res = subprocess.run(["dpkg-deb", "-x", str(deb), tmp], capture_output=True, text=True)
        if res.returncode != 0:
            raise DataError(
                f"could not extract {deb.name} ({res.stderr.strip()[-300:]}); delete it and retry"
            )
        top = RDB_DIR.split("/")[0]  # "usr": renamed into place in one step, so a crash leaves no half tree
        if not (Path(tmp) / RDB_DIR / "Rdata.rdb").is_file():
            raise DataError(f"{deb.name} has no {RDB_DIR}/Rdata.rdb; this package version is not supported")
        if (dest_dir / top).exists():
            raise DataError(f"{dest_dir / top} exists but holds no {RDB_DIR}/Rdata.rdb; delete it and retry")
        os.replace(Path(tmp) / top, dest_dir / top)
    return rdb


def austen_texts(deb_dir: Path) -> dict[str, str]:
    """The six Austen novels (file stem -> text); downloads the deb into ``deb_dir`` when not there yet."""
    books = read_rdb_character_vectors(fetch_janeausten_deb(deb_dir))
    missing = sorted(set(AUSTEN_BOOKS) - set(books))
    if missing:
        raise DataError(f"{DEB_PACKAGE} lacks the books {missing}; this package version is not supported")
    return {stem: _normalize("\n".join(books[name])) for name, stem in AUSTEN_BOOKS.items()}


# --- entry points -------------------------------------------------------------------------------------


def prepare_texts(out_dir: Path, deb_dir: Path | None = None, austen: bool = True) -> dict[str, Path]:
    """Write every corpus to ``out_dir/<name>.txt`` plus ``texts.json``; returns name -> path.

    ``deb_dir`` caches the extracted Debian package (default: ``out_dir/.janeaustenr``); when it already
    holds the extracted files nothing is downloaded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "lee_news": (lee_news_text(), f"gensim:{LEE_FILE}"),
        "wiki_sample": (wiki_sample_text(), f"gensim:{WIKI_FILE}"),
    }
    if austen:
        for stem, text in austen_texts(Path(deb_dir) if deb_dir else out_dir / ".janeaustenr").items():
            texts[stem] = (text, f"debian:{DEB_PACKAGE}")
    paths, index = {}, {}
    for name, (text, source) in sorted(texts.items()):
        path = out_dir / f"{name}.txt"
        write_text_atomic(path, text)
        paths[name] = path
        index[name] = {"file": path.name, "source": source, "sha256": sha256_file(path), "chars": len(text)}
        log.info("wrote %s (%d characters)", path, len(text))
    write_json_atomic(out_dir / INDEX, index)
    return paths


def locate_texts(text_dir: Path) -> dict[str, Path]:
    """Prepared texts in ``text_dir`` (name -> path), from ``texts.json`` or else every ``*.txt``."""
    text_dir = Path(text_dir)
    index_path = text_dir / INDEX
    if index_path.is_file():
        import json

        index = json.loads(index_path.read_text(encoding="utf-8"))
        return {name: text_dir / entry["file"] for name, entry in index.items()}
    return {p.stem: p for p in sorted(text_dir.glob("*.txt"))}
