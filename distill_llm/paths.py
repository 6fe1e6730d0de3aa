"""Where things live: the cache, built-in model names, and local-or-URL file systems."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from . import registry
from .config import CREDENTIALS_IN_URL, ConfigError, has_credentials

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
    """A built-in name (registry.py), an existing local folder, a folder URL (fetched to the cache), or a hub id (as is)."""
    builtin = registry.model(name)
    if builtin is not None:
        return str(builtin.path())
    if is_url(name):
        return fetch_dir(name)
    local = Path(name).expanduser()
    if local.is_dir():
        # an adapter folder (student.merge_lora: false) names its base in adapter_config.json
        if not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ConfigError(f"model folder {local} has no config.json (nor adapter_config.json): is it a Hugging "
                              "Face model folder?")
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


# Object stores (no directories, no rename: pyarrow's move there is copy + delete) whose single PUT is
# atomic; corpus/shards.py writes straight to the final key on them instead of write-then-rename.
OBJECT_STORES = ("s3", "gcs")
# Set for every s3:// URL: a small object goes up as one PutObject (one request, atomic) instead of a
# three-request multipart upload; S3 servers whose CompleteMultipartUpload reply pyarrow rejects
# (moto < 5.2.2) also work for files below the part size then.
_S3_OPTIONS = "allow_delayed_open=true"
ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a local path or an s3:// / gs:// URL.

    An S3-compatible endpoint other than AWS (MinIO, moto, GCS interop) comes from AWS_ENDPOINT_URL
    (or AWS_ENDPOINT_URL_S3), which pyarrow reads here and pickles into the file system it hands to Ray
    workers; credentials come from the usual AWS chain in each process and are never pickled.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if not is_url(uri):
        return pafs.LocalFileSystem(), absolute(uri)
    if has_credentials(uri):  # the config refuses these too; this covers `inspect URL` and library callers
        raise ConfigError(f"{uri.split('://', 1)[0]} URL: {CREDENTIALS_IN_URL}")
    target = uri
    if uri.startswith("s3://") and "allow_delayed_open" not in uri:
        target = f"{uri}{'&' if '?' in uri else '?'}{_S3_OPTIONS}"
    try:
        return pafs.FileSystem.from_uri(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as err:
        raise ConfigError(f"{uri}: not a usable file system URL ({err})") from None
    except OSError as err:  # without an endpoint pyarrow asks AWS for the bucket's region here
        raise _unreachable(uri, uri.split("://", 1)[1].split("/", 1)[0], err) from None


def is_object_store(fs) -> bool:
    return fs.type_name in OBJECT_STORES


def makedirs(fs, path: str) -> None:
    """Local folders must exist before files go in; object stores have none (a marker object would be left)."""
    if not is_object_store(fs):
        fs.create_dir(path, recursive=True)


def read_text(fs, path: str) -> str | None:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def check_location(uri: str, key: str) -> None:
    """Fail before any work when an object-store location cannot be reached: no bucket, no endpoint,
    no credentials. Local paths are created on demand and need no check."""
    import pyarrow.fs as pafs

    if not is_url(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as err:
        raise _unreachable(f"{key}={uri}", bucket, err) from None
    if not found:
        raise ConfigError(f"{key}={uri}: bucket {bucket!r} does not exist; create it first "
                          "(distill-llm never creates buckets)")


def _unreachable(what: str, bucket: str, err: OSError) -> ConfigError:
    """The error for a store that did not answer or refused: names the endpoint in use and what to set."""
    endpoint = next((f"{v}={os.environ[v]}" for v in ENDPOINT_VARS if os.environ.get(v)), None)
    where = f"the endpoint {endpoint}" if endpoint else \
        "the provider's default endpoint (set AWS_ENDPOINT_URL for MinIO or another S3-compatible server)"
    said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(f"{what}: cannot reach bucket {bucket!r} through {where}; check the endpoint and the "
                       "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, an instance role). "
                       f"The store said: {said}")


def join(base: str, *parts: str) -> str:
    """``base/part/...``; a URL's query string (``?region=...``) stays at the end."""
    path, _, query = base.partition("?") if is_url(base) else (base, "", "")
    joined = "/".join([path.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def fetch_dir(uri: str) -> str:
    """A copy of a remote folder (a student in S3) in the cache, for loaders that want a local folder."""
    import hashlib
    import shutil

    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if all(fs.get_file_info(join(path, f)).type == pafs.FileType.NotFound for f in ("config.json",
                                                                                  "adapter_config.json")):
        raise ConfigError(f"model {uri} has no config.json (nor adapter_config.json): is it a Hugging Face model "
                          "folder?")
    local = cache_dir() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if local.exists():  # always fresh: the remote folder may have been re-exported since
        shutil.rmtree(local)
    local.mkdir(parents=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(local)


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
