"""llama.cpp's ``llama-server`` as a benchmark peer: a subprocess on a loopback port, token ids in, token ids out.

    with LlamaServer("/path/to/llama-server", "target-f32.gguf", threads=2, spec_type="ngram-simple") as server:
        new_ids, response = server.complete([1, 2, 3], n_predict=32)          # greedy (temperature 0)

The server is started with ``--host 127.0.0.1`` and a port picked free on the loopback interface (or the
one given), then polled on ``GET /health`` until it answers 200 ("ok"), within ``ready_timeout`` seconds;
a server that exits or never becomes healthy raises ``LlamaServerError`` with the tail of its log. It is
always stopped on leaving the ``with`` block (terminate, then kill after a grace period), also on error.

Requests go to ``POST /completion`` (llama.cpp's native endpoint, tools/server/README.md) with the prompt
as a list of token ids (no BOS is added to a token-array prompt), ``return_tokens: true`` (the generated
ids come back in ``tokens``, the EOS token included when it stopped there), ``cache_prompt: false`` (every
request processes its whole prompt, as every other benchmark method does) and an explicit sampler chain:
greedy is ``samplers: ["temperature"]`` with ``temperature: 0`` (llama.cpp's temperature sampler keeps only
the arg-max token at temperature <= 0); sampling is temperature, then top-k (0 = off) and top-p, as
Hugging Face's ``generate`` orders them. Only the standard library is used (urllib), with bounded timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Self

HOST = "127.0.0.1"


class LlamaServerError(RuntimeError):
    """llama-server did not start, did not become healthy in time, or answered a request badly."""


def peak_rss(pid: int | str = "self") -> int | None:
    """A Linux process's peak resident set size in bytes (``VmHWM`` of /proc/<pid>/status), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                return int(value) * {"kB": 1024, "mB": 1024 ** 2}.get(unit, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (bound to port 0 and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def completion_request(prompt_ids: Sequence[int], n_predict: int, temperature: float = 0.0, top_k: int = 0,
                       top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False) -> dict:
    """The JSON body of one ``POST /completion`` (see the module doc)."""
    body = {"prompt": [int(t) for t in prompt_ids], "n_predict": int(n_predict), "cache_prompt": False,
            "return_tokens": True, "stream": False, "ignore_eos": bool(ignore_eos), "n_probs": 0}
    if temperature <= 0:
        body.update(temperature=0.0, samplers=["temperature"])
    else:
        body.update(temperature=float(temperature), top_k=int(top_k or 0), top_p=float(top_p), min_p=0.0,
                    samplers=["temperature", "top_k", "top_p"])
        if seed is not None:
            body["seed"] = int(seed)
    return body


class LlamaServer:
    """One ``llama-server`` process (see the module doc). ``server`` is the binary's path, or an argv prefix
    (a list) that stands for it; ``spec_type`` one of llama.cpp's ``--spec-type`` values (``none`` passes
    none); ``draft`` the draft GGUF of a ``draft-*`` type."""

    def __init__(self, server: str | os.PathLike | Sequence[str], model: str | os.PathLike, threads: int,
                 spec_type: str = "none", draft: str | os.PathLike | None = None, port: int = 0,
                 ctx_size: int | None = None, extra_args: Sequence[str] = (), ready_timeout: float = 120.0,
                 request_timeout: float = 600.0, stop_grace: float = 10.0, log=print):
        self.argv0 = [str(server)] if isinstance(server, (str, os.PathLike)) else [str(a) for a in server]
        self.model, self.threads, self.spec_type = str(model), int(threads), spec_type
        self.draft = None if draft is None else str(draft)
        self.port, self.ctx_size, self.extra_args = int(port or 0), ctx_size, [str(a) for a in extra_args]
        self.ready_timeout, self.request_timeout, self.log = float(ready_timeout), float(request_timeout), log
        self.stop_grace = float(stop_grace)
        self.process: subprocess.Popen | None = None
        self._log_file = None

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        cmd = self.argv0 + ["-m", self.model, "--host", HOST, "--port", str(self.port), "-t", str(self.threads),
                            "-tb", str(self.threads), "-np", "1", "--no-webui"]
        if self.ctx_size:
            cmd += ["-c", str(int(self.ctx_size))]
        if self.spec_type and self.spec_type != "none":
            cmd += ["--spec-type", self.spec_type]
        if self.draft is not None:
            cmd += ["-md", self.draft]
        return cmd + self.extra_args

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> Self:
        if self.process is not None:
            raise LlamaServerError("llama-server is already running")
        if not self.port:
            self.port = free_port()
        self._log_file = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115  (closed in stop())
        cmd = self.command()
        try:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                            stderr=subprocess.STDOUT)
        except OSError as e:
            self._close_log()
            raise LlamaServerError(f"could not start llama-server ({cmd[0]}): {e}") from e
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        last = "no answer"
        while True:
            code = self.process.poll()
            if code is not None:
                raise LlamaServerError(f"llama-server exited with code {code} before it was ready "
                                       f"({' '.join(self.command())}); its log ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:  # 503 while the model loads
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last = str(getattr(e, "reason", e))
            if time.monotonic() >= deadline:
                raise LlamaServerError(f"llama-server did not become healthy within {self.ready_timeout:g} s "
                                       f"(GET {self.url}/health: {last}); its log ends:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self, grace: float | None = None) -> None:
        """Terminate the process, kill it if it is still there after ``grace`` seconds (``stop_grace``);
        idempotent."""
        grace = self.stop_grace if grace is None else grace
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=grace)
        self._close_log()

    def _close_log(self) -> None:
        log, self._log_file = self._log_file, None
        if log is not None:
            log.close()
            Path(log.name).unlink(missing_ok=True)

    def log_tail(self, chars: int = 2000) -> str:
        if self._log_file is None:
            return ""
        try:
            return Path(self._log_file.name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests
    def complete(self, prompt_ids: Sequence[int], n_predict: int, **sampling) -> tuple[list[int], dict]:
        """(the generated token ids, at most ``n_predict``; the whole response) of one ``/completion``
        (``sampling``: ``completion_request``'s keywords)."""
        if self.process is None:
            raise LlamaServerError("llama-server is not running (use it as a context manager or call start())")
        body = json.dumps(completion_request(prompt_ids, n_predict, **sampling)).encode()
        req = urllib.request.Request(f"{self.url}/completion", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.request_timeout) as r:
                response = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:1000]
            raise LlamaServerError(f"llama-server answered POST /completion with HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise LlamaServerError(f"POST {self.url}/completion failed: {e}; the server log ends:\n"
                                   f"{self.log_tail()}") from e
        tokens = response.get("tokens") if isinstance(response, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise LlamaServerError(f"llama-server's /completion response has no token ids in 'tokens' "
                                   f"(return_tokens is set): {str(response)[:500]}")
        return tokens[:n_predict], response  # a speculative step may accept past the limit: cut as HF does

    # ------------------------------------------------------------------ memory (Linux)
    def reset_peak_memory(self) -> bool:
        """Reset the server process's peak RSS (``VmHWM``) through /proc/<pid>/clear_refs; False if unavailable."""
        if self.process is None:
            return False
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak_memory(self) -> int | None:
        """The server process's peak resident set size in bytes (``VmHWM``), None where unavailable."""
        return None if self.process is None else peak_rss(self.process.pid)
