"""A Hugging Face hub cache laid out by hand, as `huggingface_hub` writes it, for offline
tests of hub names: `models--org--name/blobs/<sha256>` holding the bytes,
`snapshots/<commit>/<file>` relative symlinks to them, `refs/<revision>` the commit."""

from __future__ import annotations

import hashlib
import os
import pathlib


def add_snapshot(
    cache: pathlib.Path,
    repo_id: str,
    files: dict[str, pathlib.Path],
    *,
    commit: str,
    revision: str | None = "main",
) -> pathlib.Path:
    """Adds `files` (name in the repo -> file holding its bytes) as snapshot `commit` of
    `repo_id`, pointed to by `refs/<revision>`; returns the snapshot directory.

    Large sources (a GGUF) are linked, not copied: the blob is a symlink to the source, and
    the snapshot entry a relative symlink to the blob, as the hub's own layout has it.
    """
    assert len(commit) == 40, "commit hashes are 40 hex digits"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        digest = hashlib.sha256(str(source.resolve()).encode()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            blob.symlink_to(source.resolve())
        entry = snapshot / name
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.symlink_to(os.path.relpath(blob, entry.parent))
    if revision is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes
    return snapshot
