"""Artifact files: atomic writes, sha256 and ``manifest.json``.

This is the only module that knows how an artifact directory is described. Every file is written to a
temporary name in the same directory and renamed into place, so an interrupted run never leaves a file
that looks finished; the manifest is written last, so a directory without one is unfinished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lmkiln.errors import ArtifactError, LmkilnError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) files; artifacts get the usual permissions instead.
_FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_dir(path: str | os.PathLike, pattern: str = "*") -> str:
    """One hash over the names and contents of the files matching ``pattern`` (sorted, non-recursive)."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.glob(pattern) if p.is_file()):
        h.update(f.name.encode())
        h.update(b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds.

    Running out of disk space becomes a clear :class:`LmkilnError` and leaves ``dest`` untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, _FILE_MODE)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise LmkilnError(
                f"out of disk space while writing {dest}; free space on {dest.parent} and run again "
                "(nothing was left half-written)"
            ) from e
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out_dir``; when the block succeeds it takes
    ``out_dir``'s place (:func:`publish_dir`), when it fails it is removed and ``out_dir`` is untouched."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp.chmod(DIR_MODE)
    try:
        yield tmp
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished directory ``tmp`` onto ``out_dir``; an old ``out_dir`` is deleted only after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes_atomic(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Canonical JSON (sorted keys, 2-space indent, trailing newline) so equal content gives equal bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(dest, dumps_json(obj))


def copy_file_atomic(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def save_safetensors_atomic(
    dest: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` through a temp file; tensors are made contiguous first."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact's bytes (recorded in every manifest)."""
    import importlib.metadata as md

    import lmkiln

    out = {"lmkiln": lmkiln.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "safetensors", "tokenizers", "datasets", "triton"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def write_manifest(
    artifact_dir: str | os.PathLike, kind: str, info: Mapping[str, Any], exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Hash every file in ``artifact_dir`` and write ``manifest.json`` last.

    ``info`` holds what the artifact is (format, bits, group size, source hash, config, seed...). No
    timestamps are recorded, so two builds from the same inputs give byte-identical manifests.
    """
    root = Path(artifact_dir)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel == MANIFEST or p.name.startswith(".") or rel in exclude:
            continue
        files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"kind": kind, **info, "files": files, "versions": library_versions()}
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(artifact_dir: str | os.PathLike, kind: str | None = None, verify: bool = True) -> dict:
    """Read ``manifest.json``; check its kind and (if ``verify``) every file's sha256."""
    root = Path(artifact_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{root} has no {MANIFEST}: it is not a finished lmkiln artifact "
            "(an interrupted build leaves none); rebuild it with `snakemake quantize`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifact") from e
    if kind is not None and manifest.get("kind") != kind:
        raise ArtifactError(
            f"{root} is a {manifest.get('kind')!r} artifact, expected {kind!r}; point at the right directory"
        )
    if verify:
        verify_manifest(root, manifest)
    return manifest


def verify_manifest(artifact_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    root = Path(artifact_dir)
    for rel, entry in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in {root / MANIFEST} but missing; rebuild the artifact")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise ArtifactError(
                f"{p} does not match its sha256 in {root / MANIFEST} "
                f"(expected {entry['sha256'][:12]}…, found {digest[:12]}…): the file was changed or "
                "corrupted; rebuild the artifact"
            )
