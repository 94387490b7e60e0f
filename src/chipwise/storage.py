"""Where a run directory lives: a local path, or a gs:// or s3:// URI in object storage.

Paths are etils' `epath.Path`, the layer Orbax itself uses: a local path is a pathlib path, a bucket URI goes
through fsspec (`gcsfs` for gs://, `s3fs` for s3://), configured the way those clients are: their credential
chains (environment, profile, instance or workload identity) and, for an S3-compatible endpoint,
`AWS_ENDPOINT_URL`. What object stores cannot do as a file system does is handled here and only here:
  * an object is written whole by one PUT, so a file is replaced atomically without a temporary name;
  * an exclusive create (the run lock) is a conditional PUT (If-None-Match / if-generation-match);
  * nothing can be appended to: files that grow (metrics.jsonl, TensorBoard events) are written locally and
    uploaded whole (run_dir.py, train/metrics.py);
  * Orbax 0.12 writes arrays to gs:// with tensorstore's own driver but not to s3://; `orbax_for` adds
    tensorstore's s3 driver in the one place Orbax chooses a driver, and Orbax's commit-file completion (as on
    gs://, where a directory cannot be renamed atomically).
A GCS emulator is named as Google's clients expect, by STORAGE_EMULATOR_HOST (`_gcs_emulator` passes it on).
Errors of a bucket (missing, access denied, no credentials) become one line saying what to fix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from chipwise.data.cache import atomic_path
from chipwise.errors import ChipwiseError

SCHEMES = {"gs": "gcsfs", "s3": "s3fs"}  # URI scheme: the fsspec package that serves it
EXTRA = "pip install 'chipwise[cloud]'"


def is_remote(location) -> bool:
    return str(location).split("://", 1)[0] in SCHEMES and "://" in str(location)


def _require_client(location: str) -> None:
    import logging

    for name in ("botocore", "aiobotocore", "s3fs", "gcsfs"):  # their INFO lines (credentials found...) are noise
        logging.getLogger(name).setLevel(logging.WARNING)
    import fsspec.config

    # No cached listings: other processes (the other hosts of a run, a resumed run) write into the same prefixes,
    # and Orbax's finalize on process 0 lists what every process wrote; a cached listing misses it.
    for protocol in ("s3", "s3a", "gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    scheme = str(location).split("://", 1)[0]
    if scheme == "gs":
        _gcs_emulator()
    try:
        __import__(SCHEMES[scheme])
    except ImportError:
        raise ChipwiseError(f"{scheme}:// paths need the {SCHEMES[scheme]} package, which is not installed; "
                            f"{EXTRA}") from None


def _gcs_emulator() -> None:
    """With STORAGE_EMULATOR_HOST (the variable Google's clients read for a GCS emulator, e.g. fake-gcs-server),
    send tensorstore, which writes Orbax's arrays and reads only its own TENSORSTORE_GCS_HTTP_URL, to it too; and
    keep gcsfs to the JSON API an emulator serves (gcsfs >= 2026.10 otherwise also asks every bucket's layout over
    gRPC, which an emulator does not serve: a 60 s wait per call). Neither is overridden if set."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if host:
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported


def _check_s3_credentials(location) -> None:
    """Refuse s3:// without AWS credentials in one line, before any request is made. (s3fs 2026.9 itself raises
    NoCredentialsError at its first request, which `check_bucket` would report too, as a failed listing.)"""
    import botocore.exceptions
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise bucket_error(botocore.exceptions.NoCredentialsError(), location, "opening the run directory")


def _check_gcs_credentials(location) -> None:
    """Refuse gs:// without Google credentials in one line: where gcsfs's chain (Application Default Credentials,
    its own token cache, the metadata server) finds none it goes on anonymously, and fails later, at the first
    write. Not checked where the user chose: an emulator, or a token in fsspec's config (FSSPEC_GS_TOKEN=anon for
    anonymous access, a key file)."""
    import fsspec.config

    if os.environ.get("STORAGE_EMULATOR_HOST") or fsspec.config.conf.get("gs", {}).get("token") is not None:
        return
    if (Path.home() / ".gcs_tokens").is_file():  # gcsfs's own cache of tokens from an earlier login
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise bucket_error(e, location, "opening the run directory") from None


CREDENTIAL_CHECKS = {"s3": _check_s3_credentials, "gs": _check_gcs_credentials}  # one per scheme of SCHEMES


def path(location):
    """`location` as a path object: pathlib for a local path, epath (fsspec) for a bucket URI."""
    if not is_remote(location):
        return Path(location)
    _require_client(str(location))
    from etils import epath

    return epath.Path(str(location).rstrip("/"))


def filesystem(location):
    """(fsspec file system, path within it) of a bucket URI."""
    import fsspec

    _require_client(str(location))
    return fsspec.core.url_to_fs(str(location))


def bucket_error(e: BaseException, location, doing: str) -> ChipwiseError:
    """One line for an error met while `doing` something in a bucket: what is wrong and how to fix it."""
    scheme, rest = str(location).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    name = type(e).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError", "RefreshError"):
        how = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or use an instance role"
               if scheme == "s3" else "run `gcloud auth application-default login`, set "
                                      "GOOGLE_APPLICATION_CREDENTIALS, or use a service account")
        return ChipwiseError(f"no credentials for {bucket} while {doing}: {how}")
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "403" in str(e):
        return ChipwiseError(f"access to {bucket} denied while {doing}; grant these credentials read and write "
                             f"access to the bucket, or choose another bucket")
    if isinstance(e, FileNotFoundError) and ("bucket" in str(e).lower() or doing == "listing the bucket"):
        return ChipwiseError(f"bucket {bucket} does not exist (while {doing}); create it or fix the URI")
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else name
    return ChipwiseError(f"{bucket}: {doing} failed ({name}: {first})")


def check_bucket(location) -> None:
    """Refuse, in one line, a bucket that does not exist or that these credentials cannot read; write access is
    found out by the first write (run_dir.prepare)."""
    fs, where = filesystem(location)
    bucket = where.split("/", 1)[0]
    CREDENTIAL_CHECKS[str(location).split("://", 1)[0]](location)
    try:
        fs.ls(bucket, refresh=True)
    except Exception as e:  # noqa: BLE001 - the client's own error types differ by store
        raise bucket_error(e, location, "listing the bucket") from None


# ---- what object stores do differently --------------------------------------------------------------------
def write_whole(target, text: str) -> None:
    """Replace `target` with `text`, never leaving it half-written: on a disk through a temporary file and one
    rename; an object is written by one PUT, whole or not at all."""
    if is_remote(target):
        target.write_text(text)
        return
    with atomic_path(Path(target)) as tmp:
        tmp.write_text(text)


def create_exclusive(target, data: bytes) -> bool:
    """Create `target` holding `data` only if it does not exist; False if it did. A local file is opened with
    O_EXCL; an object is a conditional PUT."""
    if not is_remote(target):
        try:
            fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, where = filesystem(target)
    try:
        fs.pipe_file(where, data, mode="create")
    except FileExistsError:
        return False
    return True


def modified(target) -> float:
    """The last-modified time of a file or object, in seconds since the epoch."""
    if not is_remote(target):
        return Path(target).stat().st_mtime
    fs, where = filesystem(target)
    fs.invalidate_cache(where)  # fsspec caches listings; another process may have rewritten it
    info = fs.info(where)
    stamp = info.get("LastModified") or info.get("updated") or info.get("mtime")
    if isinstance(stamp, str):
        from datetime import datetime

        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)


def touch(target) -> None:
    """Mark `target` as modified now (an object is rewritten with its own content)."""
    if not is_remote(target):
        os.utime(target)
        return
    fs, where = filesystem(target)
    fs.pipe_file(where, fs.cat_file(where))


def remove_tree(target) -> None:
    if is_remote(target):
        fs, where = filesystem(target)
        if fs.exists(where):
            fs.rm(where, recursive=True)
    elif Path(target).is_dir():
        shutil.rmtree(target)
    else:
        Path(target).unlink(missing_ok=True)


def move_tree(source, target) -> None:
    """Move a directory (an object store copies each object, then deletes the source)."""
    if not is_remote(source):
        shutil.move(str(source), str(target))
        return
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    fs.copy(src, dst, recursive=True)
    fs.rm(src, recursive=True)


def upload(local: Path, target) -> None:
    """Copy a local file or directory to `target` (replacing what is there), for files an object store cannot
    append to."""
    fs, where = filesystem(target)
    if local.is_dir():
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(f), f"{where}/{f.relative_to(local).as_posix()}")
    elif local.is_file():
        fs.put_file(str(local), where)


def download(source, local: Path) -> None:
    """Copy `source` (a file or directory in a bucket) to `local`, if it exists."""
    fs, where = filesystem(source)
    if fs.isdir(where):
        for name in fs.find(where):
            out = local / name[len(where):].lstrip("/")
            out.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(out))
    elif fs.isfile(where):
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(where, str(local))


# ---- Orbax on s3:// -------------------------------------------------------------------------------------------
_ORBAX_HOOKED = False


def _s3_kvstore(uri: str) -> dict:
    bucket, _, key = uri[len("s3://"):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):  # as boto3 reads them
        spec["endpoint"] = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def orbax_for(location) -> None:
    """Prepare Orbax to write to `location`: for s3://, point its tensorstore specs at the s3 driver and use
    commit-file completion. A no-op for local and gs:// paths, which Orbax handles itself."""
    global _ORBAX_HOOKED
    if _ORBAX_HOOKED or not str(location).startswith("s3://"):
        return
    from orbax.checkpoint._src.path import atomicity, atomicity_defaults, gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    if not all(hasattr(ts_utils, f) for f in ("_normalize_path", "_use_gcs_driver")) or not hasattr(
            gcs_utils, "get_kvstore_for_gcs"):
        import orbax.checkpoint

        raise ChipwiseError(f"s3:// checkpoints need orbax-checkpoint 0.12 (installed: "
                            f"{orbax.checkpoint.__version__}); pip install 'orbax-checkpoint>=0.12,<0.13'")
    normalize, use_driver, kvstore = ts_utils._normalize_path, ts_utils._use_gcs_driver, gcs_utils.get_kvstore_for_gcs
    ts_utils._normalize_path = lambda p: (normalize(p).replace("s3:/", "s3://", 1) if str(p).startswith("s3:/")
                                          else normalize(p))
    ts_utils._use_gcs_driver = lambda d: d.startswith("s3://") or use_driver(d)
    gcs_utils.get_kvstore_for_gcs = lambda p: _s3_kvstore(p) if p.startswith("s3://") else kvstore(p)
    for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
        original = getattr(atomicity_defaults, name, None)
        if original is not None:
            setattr(atomicity_defaults, name, lambda p, *a, _o=original, **k: (
                atomicity.CommitFileTemporaryPath if str(p).startswith("s3://") else _o(p, *a, **k)))
    _ORBAX_HOOKED = True
