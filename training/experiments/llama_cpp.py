"""llama.cpp beside treespec: its own converter (HF directory -> GGUF) and, where built, its server.

llama.cpp's sources come from the PyPI sdist ``llama-cpp-python==0.3.36`` (its ``vendor/llama.cpp``),
downloaded once into ``$TREESPEC_CACHE/llama.cpp-<version>``:

    src = llama_cpp_source()                                   # download + unpack once
    convert_to_gguf(draft_dir, "draft.gguf", target_dir=...)   # an EAGLE-3 draft needs its target's dir
    convert_to_gguf(target_dir, "target-f32.gguf")             # the target itself, F32
    build_llama_cpp(src)                                       # cmake, ~10 minutes on 2 cores: llama-server, llama-bench

The converter runs in a subprocess with llama.cpp's own ``gguf-py`` first on the path (it needs numpy,
torch, transformers, safetensors and sentencepiece, all in requirements.txt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from filelock import FileLock

from models.errors import ModelLoadError
from models.paths import cache_root

VERSION = "0.3.36"
SDIST = f"llama-cpp-python=={VERSION}"


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp's sources or binaries cannot be had here (no registry access, no compiler, ...)."""


def llama_cpp_source(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``vendor/llama.cpp`` folder of the pinned sdist, downloaded and unpacked once."""
    root = cache_root(cache_dir) / f"llama.cpp-{VERSION}"
    src = root / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    with FileLock(str(root) + ".lock"):
        if (src / "convert_hf_to_gguf.py").is_file():
            return src
        root.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                              SDIST, "-d", str(root)], capture_output=True, text=True)
        archives = sorted(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
        if got.returncode != 0 or not archives:
            raise LlamaCppUnavailable(f"could not download the {SDIST} sdist (llama.cpp's sources): "
                                      f"{got.stderr.strip()[-500:]}")
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        tmp = root / "llama.cpp.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name != prefix.rstrip("/")]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(src)
        archives[0].unlink()
    return src


def convert_to_gguf(model_dir: str | os.PathLike, out_file: str | os.PathLike, outtype: str = "f32",
                    target_dir: str | os.PathLike | None = None, cache_dir=None, timeout: int = 900) -> Path:
    """``convert_hf_to_gguf.py model_dir --outtype outtype --outfile out_file`` (``--target-model-dir``
    for an EAGLE-3 draft: the converter reads the target's tokenizer, vocabulary size and depth)."""
    src = llama_cpp_source(cache_dir)
    out = Path(out_file).resolve()  # the converter runs inside llama.cpp's folder: absolute paths only
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(Path(model_dir).resolve()), "--outtype", outtype,
           "--outfile", str(out)]
    if target_dir is not None:
        cmd += ["--target-model-dir", str(Path(target_dir).resolve())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
    got = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=src, timeout=timeout)
    if got.returncode != 0 or not out.is_file():
        raise ModelLoadError(f"llama.cpp's converter failed on {model_dir}:\n{got.stderr.strip()[-3000:]}")
    return out


def build_llama_cpp(src: Path | None = None, targets=("llama-server", "llama-bench"), jobs: int | None = None) -> Path:
    """Build llama.cpp's binaries (Release, this CPU's instructions, no network features) into
    ``src/build/bin``; about 10 minutes on 2 cores. Returns the bin folder."""
    src = src or llama_cpp_source()
    build = src / "build"
    bins = build / "bin"
    if all((bins / t).is_file() for t in targets):
        return bins
    if shutil.which("cmake") is None:
        raise LlamaCppUnavailable("building llama.cpp needs cmake (apt-get install cmake)")
    configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2), "--target", *targets]):
        got = subprocess.run(cmd, capture_output=True, text=True)
        if got.returncode != 0:
            raise LlamaCppUnavailable(f"building llama.cpp failed ({' '.join(cmd[:3])} ...):\n{got.stderr[-3000:]}")
    return bins
