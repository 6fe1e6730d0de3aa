"""Where things live: the cache, built-in model names, and local-or-URL file systems."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError

BUILTIN_MODELS = ("toy-teacher", "toy-student")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def cache_dir() -> Path:
    path = Path(os.environ.get("DISTILL_LLM_CACHE", Path.home() / ".cache" / "distill-llm"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_url(path: str) -> bool:
    return bool(_URL.match(path)) and not path.startswith("file://")


def absolute(path: str) -> str:
    """Local paths made absolute (Ray workers run elsewhere); URLs unchanged."""
    if is_url(path):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def resolve_model(name: str) -> str:
    """A built-in toy name, an existing local folder, or a hub id (passed on as is)."""
    if name == "toy-teacher":
        from .toy import TEACHER_ASSET

        return str(TEACHER_ASSET)
    if name == "toy-student":
        from .toy import toy_student_path

        return str(toy_student_path())
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(f"model folder {local} has no config.json: is it a Hugging Face model folder?")
        return str(local.resolve())
    if name.startswith((".", "/", "~")) or local.suffix or name.count("/") > 1:
        raise ConfigError(f"model path {name} does not exist (and it is not a hub id like 'Qwen/Qwen2.5-1.5B')")
    return name


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or an s3:// / gs:// URL."""
    import pyarrow.fs as pafs

    if not is_url(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


class WriteFailed(OSError):
    """A write under an output dir failed (disk full, read-only, denied). Raised in Ray tasks, so the
    driver can tell a storage failure from other errors and say that a rerun resumes."""


@contextmanager
def writing():
    """Mark OSErrors raised inside as write failures (the driver names the output dir)."""
    try:
        yield
    except WriteFailed:
        raise
    except OSError as err:
        raise WriteFailed(str(err)) from err
