"""Helpers shared by the save/load formats (int8 models, weight-only LLM checkpoints)."""
from __future__ import annotations

import hashlib
from pathlib import Path


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

