"""The cache directory and atomic writes into it.

Several processes (one per host) may prepare the same data at once against a shared cache: each writes
its own temporary file and renames it into place, so a reader sees either nothing or a complete file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from chipwise.config import DataConfig


def default_cache_dir(data_cfg: DataConfig | None = None) -> Path:
    """data.cache_dir, else $CHIPWISE_CACHE, else $XDG_CACHE_HOME/chipwise, else ~/.cache/chipwise."""
    if data_cfg is not None and data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get("CHIPWISE_CACHE"):
        return Path(os.environ["CHIPWISE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "chipwise"
    return Path.home() / ".cache" / "chipwise"


@contextmanager
def atomic_path(target: Path):
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable by all
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
