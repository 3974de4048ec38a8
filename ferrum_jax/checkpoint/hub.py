"""Hub names (`org/name`) resolved to local files through `huggingface_hub` and its cache.

A name that is not an existing path but looks like a repo id is looked up in the Hugging Face
cache first (the layout `huggingface_hub` writes: `models--org--name/refs/<revision>`,
`snapshots/<commit>/...`), so a cached model loads without the network. Only when it is not
there, and downloads are allowed, the files ferrum-jax reads are fetched: safetensors
weights, `config.json`, tokenizer files, or one `.gguf`. Pickled weights (`.bin`, `.pt`,
`.pth`, `.ckpt`, `.pkl`) are never downloaded: loading them can run code.

The environment is read at every call (not when `huggingface_hub` was imported):
`HF_HUB_CACHE` (else `HF_HOME/hub`, else `~/.cache/huggingface/hub`) and `HF_HUB_OFFLINE`
(or `TRANSFORMERS_OFFLINE`).

`revision` and `gguf_file` become file paths inside the cache (`refs/<revision>`,
`snapshots/<commit>/<gguf_file>`), so both are checked as names first (git's ref-name rules,
a relative file name), and every path the cache leads to (a `refs/` file holds a commit that
becomes a directory name) must stay inside the repo's `snapshots/` folder.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

from ferrum_jax.errors import FerrumError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
"""`org/name` as the Hub spells repo ids (one slash, no `..`, no leading dot)."""
_CONFIG_FILES = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
]
_SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_repo_id(name: str | os.PathLike) -> bool:
    """`name` is spelled like a Hub repo id (`org/name`) and is not an existing path."""
    text = os.fspath(name)
    return (
        _REPO_ID.fullmatch(text) is not None
        and ".." not in text
        and not pathlib.Path(text).exists()
    )


def cache_dir() -> pathlib.Path:
    """The Hugging Face hub cache, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return pathlib.Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return pathlib.Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(xdg).expanduser() / "huggingface" / "hub"


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set: nothing may be downloaded."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def resolve(
    repo_id: str, *, revision: str | None = None, gguf_file: str | None = None
) -> pathlib.Path:
    """The local model path for hub repo `repo_id`: a snapshot directory (HF safetensors) or
    a `.gguf` file inside one (`gguf_file`, or the repo's only `.gguf`).

    From the cache when the snapshot there holds a model; otherwise downloaded, unless
    offline. A miss offline is one `FerrumError.not_found` naming the path and the cache.
    """
    check_revision(revision)
    check_gguf_file(gguf_file)
    hub = _hub()
    cache = cache_dir()
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        snapshot = hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=_patterns(gguf_file),
        )
        snapshot = _inside_cache(pathlib.Path(snapshot), cache, repo_id, where)
        found = _model_in(snapshot, gguf_file, where)
        if found is not None:
            return _inside_cache(found, cache, repo_id, where)
        miss = f"the cached snapshot {snapshot} holds no model files"
    except (hub.errors.LocalEntryNotFoundError, hub.errors.IncompleteSnapshotError) as e:
        miss = f"not in the Hugging Face cache {cache}"
        if isinstance(e, hub.errors.IncompleteSnapshotError):
            miss = f"the cached snapshot in {cache} is incomplete"
    except hub.errors.HFValidationError as e:
        raise FerrumError.invalid_parameter(f"{repo_id}: not a valid repo id ({e})") from None
    if offline():
        raise FerrumError.not_found(
            f"{where}: no such file or directory, and {miss}; HF_HUB_OFFLINE is set, so "
            "nothing was downloaded"
        )
    # The library falls back on the cache's refs/ when the network fails: check again.
    found = _download(hub, repo_id, revision, gguf_file, cache, where, miss)
    return _inside_cache(found, cache, repo_id, where)


_REF_FORBIDDEN = frozenset(" ~^:?*[\\")
"""Characters `git check-ref-format` refuses anywhere in a ref name (besides controls)."""


def check_revision(revision: object) -> None:
    """Refuses a `revision` that is not a branch, tag or commit name by git's ref-name rules
    (`git check-ref-format`), before it becomes a path under `refs/` in the cache.

    Slashes are allowed between components (`refs/pr/1`, `feature/x`); every component must
    be non-empty, not start with `.` (so no `.` or `..`) and not end with `.lock`.
    """
    if revision is None:
        return
    if not isinstance(revision, str):
        raise FerrumError.invalid_parameter(
            f"revision must be a branch, tag or commit name (a string), got "
            f"{type(revision).__name__} {revision!r}"
        )
    bad = (
        not revision
        or revision == "@"
        or "@{" in revision
        or revision.endswith(".")
        or any(c in _REF_FORBIDDEN or ord(c) < 0x20 or ord(c) == 0x7F for c in revision)
        or any(
            not part or part.startswith(".") or part.endswith(".lock")
            for part in revision.split("/")
        )
    )
    if bad:
        raise FerrumError.invalid_parameter(
            f"revision {revision!r} is not a branch, tag or commit name (git ref-name rules: "
            "no empty, '.'-prefixed or '..' components, no leading or trailing '/', no '\\', "
            "spaces or control characters)"
        )


def check_gguf_file(gguf_file: object) -> None:
    """Refuses a `gguf_file` that is not the relative name of a `.gguf` file inside the repo
    (subfolders allowed), before it becomes a path under the snapshot."""
    if gguf_file is None:
        return
    ok = (
        isinstance(gguf_file, str)
        and gguf_file.lower().endswith(".gguf")
        and "\\" not in gguf_file
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in gguf_file)
        and all(part and part not in (".", "..") for part in gguf_file.split("/"))
    )
    if not ok:
        raise FerrumError.invalid_parameter(
            f"gguf_file must be the name of a .gguf file inside the repo (e.g. "
            f"'model-Q4_0.gguf' or 'sub/model.gguf'), got {gguf_file!r}"
        )


def _inside_cache(
    path: pathlib.Path, cache: pathlib.Path, repo_id: str, where: str
) -> pathlib.Path:
    """`path` (as given) when it lies in `repo_id`'s `snapshots/` folder of the cache, else
    one error.

    Folders are resolved (a `refs/` file holding `../..` must not lead out), the last
    component is not: a snapshot's files are the cache's own symlinks to its blobs.
    """
    snapshots = (cache / ("models--" + repo_id.replace("/", "--")) / "snapshots").resolve()
    real = path.resolve() if path.is_dir() else path.parent.resolve() / path.name
    if real == snapshots or not real.is_relative_to(snapshots):
        raise FerrumError.invalid_parameter(
            f"{where}: the Hugging Face cache points to {path}, outside {snapshots} (a "
            "corrupted or hostile refs/ file?); refusing to load it"
        )
    return path


def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors
    except ImportError as e:  # pragma: no cover - a core dependency
        raise FerrumError.unsupported(
            f"hub names need huggingface_hub (pip install huggingface_hub): {e}"
        ) from e
    return huggingface_hub


def _patterns(gguf_file: str | None) -> list[str]:
    if gguf_file is not None:
        return [gguf_file]
    return [*_CONFIG_FILES, *_SAFETENSORS, "*.gguf"]


def _model_in(snapshot: pathlib.Path, gguf_file: str | None, where: str) -> pathlib.Path | None:
    """The model inside a snapshot directory, or None when it holds none."""
    if gguf_file is not None:
        path = snapshot / gguf_file
        return path if path.is_file() else None
    if (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors")):
        return snapshot
    ggufs = sorted(p for p in snapshot.rglob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return ggufs[0]
    if ggufs:
        names = ", ".join(str(p.relative_to(snapshot)) for p in ggufs)
        raise FerrumError.invalid_parameter(
            f"{where} holds several .gguf files ({names}); choose one with gguf_file (--gguf-file)"
        )
    return None


def _download(
    hub: Any,
    repo_id: str,
    revision: str | None,
    gguf_file: str | None,
    cache: pathlib.Path,
    where: str,
    miss: str,
) -> pathlib.Path:
    try:
        if gguf_file is not None:
            return pathlib.Path(
                hub.hf_hub_download(repo_id, gguf_file, revision=revision, cache_dir=cache)
            )
        files = hub.HfApi().list_repo_files(repo_id, revision=revision)
        ggufs = [f for f in files if f.endswith(".gguf")]
        if any(f.endswith(".safetensors") for f in files):
            snapshot = hub.snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=[*_CONFIG_FILES, *_SAFETENSORS],
            )
            return pathlib.Path(snapshot)
        if len(ggufs) == 1:
            return pathlib.Path(
                hub.hf_hub_download(repo_id, ggufs[0], revision=revision, cache_dir=cache)
            )
        if ggufs:
            raise FerrumError.invalid_parameter(
                f"{where} holds several .gguf files ({', '.join(ggufs)}); choose one with "
                "gguf_file (--gguf-file)"
            )
        pickles = [f for f in files if f.endswith(_PICKLES)]
        if pickles:
            raise FerrumError.unsupported(
                f"{where} ships only pickled weights ({', '.join(pickles[:3])}), which "
                "ferrum-jax never loads (unpickling can run code); use a safetensors or "
                "GGUF repo"
            )
        raise FerrumError.not_found(f"{where} holds no safetensors or .gguf weights")
    except FerrumError:
        raise
    except Exception as e:  # network, authentication, missing repo: all from the library
        raise FerrumError.not_found(
            f"{where}: no such file or directory, {miss}, and downloading it failed: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        ) from e
