"""Where a result came from: code version, packages, machine (and the resolved config), for any script's JSON.

    from training.provenance import provenance
    result["provenance"] = provenance(device=decoder.device)          # git, packages, machine, time, argv
    result["provenance"] = provenance(cfg, device="cuda")              # + the resolved Hydra config

- ``git``: the commit checked out, whether the work tree differs from it (``dirty``: modified,
  staged or untracked-but-not-ignored files) and the first ``MAX_CHANGES`` ``git status --porcelain``
  lines; ``None`` values when git or the repository is not available.
- ``packages``: the Python version and, for every package pinned in ``requirements.txt`` (the
  versions treespec is tested with), the installed version; ``mismatched`` lists those that differ.
- ``machine``: ``device_description`` of the device that ran the models (CUDA device name, or the
  CPU model and core count; ``models.policy.cost_profile``'s, which its cache keys use), the OS, the CPU model,
  logical CPUs and the CPUs this process may use, torch intra-/inter-op threads, and the CUDA /
  cuDNN versions and GPU names when CUDA is available.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from models.paths import REPO_ROOT
from models.policy.cost_profile import (
    device_description,  # the same dict the cost-profile cache keys use
)

MAX_CHANGES = 50

__all__ = ["provenance", "git_info", "package_versions", "machine_info", "device_description", "cpu_model"]


def cpu_model() -> str:
    """The CPU model name (/proc/cpuinfo on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                name = line.split(":", 1)[1].strip()
                if name:
                    return name
                break
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str, root: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_info(root: str | Path = REPO_ROOT) -> dict:
    """{"commit", "dirty", "changes"} of the repository at ``root`` (None values without git)."""
    root = Path(root)
    commit = _git("rev-parse", "HEAD", root=root)
    status = _git("status", "--porcelain", root=root) if commit is not None else None
    changes = [line for line in status.splitlines() if line.strip()] if status is not None else None
    return {"commit": commit.strip() if commit else None,
            "dirty": bool(changes) if changes is not None else None,
            "changes": changes[:MAX_CHANGES] if changes is not None else None,
            "changes_total": len(changes) if changes is not None else None}


def _pins(requirements: Path) -> dict[str, str]:
    pins = {}
    try:
        lines = requirements.read_text().splitlines()
    except OSError:
        return pins
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (s.strip() for s in line.split("==", 1))
            pins[name] = version
    return pins


def package_versions(requirements: str | Path = REPO_ROOT / "requirements.txt") -> dict:
    """{"python", "pinned": {name: {"pinned", "installed"}}, "mismatched": [names]}; torch and
    transformers are always listed, pinned or not (``installed`` is None when not installed)."""
    pins = _pins(Path(requirements))
    for name in ("torch", "transformers"):
        pins.setdefault(name, None)
    pinned = {}
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        pinned[name] = {"pinned": version, "installed": installed}
    # torch reports e.g. 2.13.0+cpu: the local build tag does not make it another release
    mismatched = [n for n, v in pinned.items()
                  if v["pinned"] is not None and (v["installed"] or "").split("+", 1)[0] != v["pinned"]]
    return {"python": platform.python_version(), "python_implementation": platform.python_implementation(),
            "pinned": pinned, "mismatched": mismatched}


def machine_info(device: torch.device | str | None = None) -> dict:
    cuda = torch.cuda.is_available()
    info = {
        "device": device_description(device) if device is not None else None,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cuda": None,
    }
    if cuda:
        info["cuda"] = {"version": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    return info


def provenance(cfg=None, device: torch.device | str | None = None, root: str | Path = REPO_ROOT) -> dict:
    """Everything above in one dict, plus the local time and the command line; ``cfg`` (a Hydra
    DictConfig or a plain dict) is added resolved under ``config`` when given."""
    out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": list(sys.argv), "git": git_info(root),
           "packages": package_versions(Path(root) / "requirements.txt"), "machine": machine_info(device)}
    if cfg is not None:

        out["config"] = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return out
