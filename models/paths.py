"""Where treespec finds its files: the configs, the repository root, the cache.

In a source checkout (editable install) the configs are the repository's ``configs/``, the ones users
edit. After a plain ``pip install .`` they travel inside the package as ``treespec_configs`` (mapped
from the same folder by ``pyproject.toml``), so the default config builds from any directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent  # models/
REPO_ROOT = PACKAGE_ROOT.parent  # the checkout (or site-packages after a plain install)
CHECKPOINTS = PACKAGE_ROOT / "checkpoints"  # the shipped drafts and learned checkpoints


def _config_dir() -> Path:
    repo = REPO_ROOT / "configs"
    if (repo / "config.yaml").is_file():
        return repo
    spec = importlib.util.find_spec("treespec_configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return repo  # compose() then fails with Hydra's own "config directory not found"


CONFIG_DIR = _config_dir()


def repo_path(path: str | os.PathLike) -> Path:
    """Config paths (``data_dir``, ``output_dir``) are relative to the repo root, whatever the cwd."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else $TREESPEC_CACHE, else ~/.cache/treespec."""
    root = cache_dir or os.environ.get("TREESPEC_CACHE") or Path.home() / ".cache" / "treespec"
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
