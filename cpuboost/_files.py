"""Helpers shared by the save/load formats (int8 models, weight-only LLM checkpoints)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cpuboost.errors import PackageError


def dedup_tensors(tensors: dict) -> tuple[dict, dict]:
    """safetensors stores no shared storage: one copy of each, the others as aliases."""
    first: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for k, t in tensors.items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in first:
            aliases[k] = first[ident]
        else:
            first[ident] = k
            kept[k] = t.detach().contiguous()
    return kept, aliases


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a file, recorded at save time and checked at load time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}



def read_manifest(path: Path, name: str, fmt: str, version: int, kind: str,
                  writer: str) -> dict:
    """The JSON manifest ``path/name`` of a saved model, checked to be format ``fmt`` at
    ``version``; a clear ``PackageError`` otherwise (``kind``/``writer`` name it for the user)."""
    try:
        manifest = json.loads((path / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PackageError(f"cannot read {path / name}: {e}. Pass the directory {writer} "
                           "wrote.") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise PackageError(f"{path} is not a {kind} (no format {fmt!r}).")
    if manifest.get("version") != version:
        raise PackageError(f"{path} has format version {manifest.get('version')!r}; this "
                           f"cpuboost reads version {version}.")
    return manifest


def check_digest(file: Path, recorded: dict, writer: str) -> None:
    """Refuse a tensor file whose size/SHA-256 differ from what was recorded at save time."""
    want = {k: recorded.get(k) for k in ("bytes", "sha256")}
    if not file.exists() or file_digest(file) != want:
        raise PackageError(f"{file} is missing, truncated or altered (its size/SHA-256 differ "
                           f"from what {writer} recorded); save the model again.")
