"""Atomic writes and manifests."""

from __future__ import annotations

import errno

import pytest

from lmkiln.artifact import (
    atomic_path,
    read_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from lmkiln.errors import ArtifactError, LmkilnError


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    dest = tmp_path / "out.txt"
    write_text_atomic(dest, "old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_disk_full_is_a_clear_error(tmp_path):
    dest = tmp_path / "big.bin"
    with pytest.raises(LmkilnError, match="out of disk space"), atomic_path(dest):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_written_files_are_not_private(tmp_path):
    write_text_atomic(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o044 == 0o044


def test_manifest_roundtrip_and_tamper_detection(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.json").write_text("{}")
    m = write_manifest(tmp_path, "awq", {"bits": 4})
    assert set(m["files"]) == {"w.bin", "sub/t.json"}
    assert read_manifest(tmp_path, kind="awq")["bits"] == 4
    with pytest.raises(ArtifactError, match="expected 'packed'"):
        read_manifest(tmp_path, kind="packed")
    (tmp_path / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        read_manifest(tmp_path)
    (tmp_path / "w.bin").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_manifest(tmp_path)


def test_manifest_is_byte_stable(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"weights")
    write_manifest(tmp_path, "awq", {"b": 1, "a": 2})
    first = (tmp_path / "manifest.json").read_bytes()
    write_manifest(tmp_path, "awq", {"a": 2, "b": 1})
    assert (tmp_path / "manifest.json").read_bytes() == first


def test_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError, match="not a finished lmkiln artifact"):
        read_manifest(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", {"kind": "awq"})
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
