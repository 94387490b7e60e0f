"""What exactly ran: chipwise's version and git commit, the versions of the libraries that shape the numbers,
and the devices. Stored in run_info.json so a report can say it long after the environment is gone.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import chipwise

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tokenizers", "numpy")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> dict:
    """The commit of the checkout chipwise runs from, and whether it had uncommitted changes.

    An installed wheel, a machine without git, or a slow file system all give commit None, never an error.
    """
    where = str(path or Path(chipwise.__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None, "note": "not a git checkout"}
        status = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
        return {"commit": commit.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "dirty": None, "note": f"git unavailable ({type(e).__name__})"}


def device_list(devices) -> list[dict]:
    return [{"id": d.id, "kind": d.device_kind, "platform": d.platform, "process": d.process_index}
            for d in devices]


def collect(devices) -> dict:
    return {
        "chipwise": chipwise.__version__,
        "git": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device_list": device_list(devices),
    }
