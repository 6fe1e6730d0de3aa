"""Where things live: the cache, built-in model names, and local-or-URL file systems."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .config import ConfigError

BUILTIN_MODELS = ("toy-teacher", "toy-student")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# A missing path ending like a file is a typo, not a hub id; any other suffix is not checked because
# hub ids hold dots ("Qwen/Qwen2.5-7B-Instruct" has Path.suffix ".5B-Instruct").
_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".parquet", ".jsonl")


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
    if name.startswith((".", "/", "~")) or local.suffix.lower() in _FILE_SUFFIXES or name.count("/") > 1:
        raise ConfigError(f"model path {name} does not exist (and it is not a hub id like 'Qwen/Qwen2.5-1.5B')")
    return name


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights_format(path: str, allow_pickle: bool, key: str) -> None:
    """Refuse a local model folder whose weights exist only as pickles, unless ``key`` opts in.

    Unpickling runs arbitrary code, so a downloaded ``pytorch_model.bin`` is as dangerous as a script.
    Hub ids are not checked here: the loaders are told to read safetensors only.
    """
    folder = Path(path)
    if allow_pickle or not folder.is_dir():
        return
    files = [f.name for f in folder.iterdir() if f.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ConfigError(f"model folder {folder} holds weights only as pickle files ({', '.join(pickles[:3])}), "
                          f"which can run code when loaded: convert them to safetensors, or set {key}=true "
                          "if you trust their source")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or an s3:// / gs:// URL."""
    import pyarrow.fs as pafs

    if not is_url(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])
