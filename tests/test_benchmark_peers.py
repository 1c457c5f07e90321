"""The benchmark's peers: Hugging Face prompt lookup decoding (``hf_prompt_lookup``) and llama.cpp's
``llama-server`` (``llama_cpp``), the latter's wrapper driven against a fake server written here (a
Python ``http.server`` on 127.0.0.1 with ``/health`` and ``/completion`` returning fixed token ids)."""

import json
import os
import sys
import textwrap
import time

import pytest
from conftest import tiny_model, tiny_tokenizer
from rich.console import Console

from models.errors import ConfigError
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.experiments.benchmark import run_benchmark
from training.experiments.llama_server import (
    LlamaServer,
    LlamaServerError,
    completion_request,
)
from training.experiments.report import print_report

FIXED = [11, 12, 13, 14, 15]  # what the fake server "generates"

FAKE_SERVER = textwrap.dedent(f"""
    import argparse, json, os, signal, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer

    p = argparse.ArgumentParser()
    p.add_argument("--host"); p.add_argument("--port", type=int)
    p.add_argument("--fake-mode", default="ok"); p.add_argument("--fake-record")
    args, rest = p.parse_known_args()

    def record(kind, value):
        if args.fake_record:
            with open(args.fake_record, "a") as f:
                f.write(json.dumps({{"kind": kind, "value": value}}) + "\\n")

    record("start", {{"pid": os.getpid(), "argv": sys.argv[1:]}})
    if args.fake_mode == "crash":
        sys.exit(3)
    if args.fake_mode == "stubborn":  # ignores SIGTERM: only a kill stops it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path != "/health":
                return self.reply(404, {{"error": "not found"}})
            loading = args.fake_mode == "never_healthy" or time.monotonic() - started < 0.3
            if loading:
                return self.reply(503, {{"error": {{"code": 503, "message": "Loading model"}}}})
            self.reply(200, {{"status": "ok"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            record("completion", body)
            if self.path != "/completion":
                return self.reply(404, {{"error": "not found"}})
            tokens = {FIXED!r} if body.get("return_tokens") else []
            self.reply(200, {{"content": "w11 w12", "tokens": tokens, "stop_type": "limit"}})

    HTTPServer((args.host, args.port), Handler).serve_forever()
""")


@pytest.fixture
def fake(tmp_path):
    """(argv that stands for llama-server, the record file it appends to, a dummy GGUF)."""
    script = tmp_path / "fake_llama_server.py"
    script.write_text(FAKE_SERVER)
    model = tmp_path / "target.gguf"
    model.write_bytes(b"GGUF")
    return [sys.executable, str(script)], tmp_path / "record.jsonl", model


def records(path, kind):
    if not path.exists():
        return []
    return [r["value"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def target_only_decoder(target=None):
    config = SpeculativeDecodingConfig.from_overrides(["decoding.method=target_only"])
    return SpeculativeDecoder.from_models(target or tiny_model("llama"), None, tiny_tokenizer(), config)


PROMPTS = [{"id": f"p{i}", "prompt": f"w{i + 5} w7 w9 w{i + 5} w7 w9 w{i + 5} w7"} for i in range(3)]


# ---------------------------------------------------------------------- hf_prompt_lookup
def test_hf_prompt_lookup_is_the_targets_greedy_output():
    target = tiny_model("llama")
    decoder = target_only_decoder(target)
    seen = []
    generate = target.generate
    target.generate = lambda *a, **kw: (seen.append(kw.get("prompt_lookup_num_tokens")), generate(*a, **kw))[1]
    out = run_benchmark(decoder, PROMPTS, ["target_only", "hf_generate", "hf_prompt_lookup"], 12, 64, 1,
                        {"do_sample": False}, log=lambda *_: None, prompt_lookup_num_tokens=4)
    rows = out["rows"]
    assert list(rows) == ["target_only", "hf_generate", "hf_prompt_lookup"]
    assert rows["hf_prompt_lookup"]["identical"] == 2 and rows["hf_prompt_lookup"]["new_tokens"] > 0
    assert rows["hf_prompt_lookup"]["phase_time_s"].keys() == {"outside"}  # an HF method: no phases
    assert "speedup_vs_target_only" in rows["hf_prompt_lookup"]
    assert seen.count(4) == 3  # one warm-up + two timed runs passed N to generate; the others none
    with pytest.raises(ConfigError, match="prompt_lookup_num_tokens"):
        run_benchmark(decoder, PROMPTS, ["target_only", "hf_prompt_lookup"], 4, 64, 0, {"do_sample": False},
                      log=lambda *_: None)


# ---------------------------------------------------------------------- llama_cpp: skipped when missing
def test_llama_cpp_is_skipped_with_one_line_without_a_server_binary(tmp_path, monkeypatch):
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path / "cache"))  # no llama.cpp build there
    decoder = target_only_decoder()
    logged = []
    out = run_benchmark(decoder, PROMPTS[:2], ["target_only", "llama_cpp"], 4, 64, 1, {"do_sample": False},
                        log=logged.append, llama_cpp={"server": None, "spec_types": ["none", "ngram-simple"]})
    assert list(out["rows"]) == ["target_only"]
    skips = [m for m in logged if m.startswith("skip")]
    assert len(skips) == 1 and "llama_cpp, llama_cpp[ngram-simple]" in skips[0]
    assert "llama-server" in skips[0] and "build_llama_cpp" in skips[0]
    logged.clear()
    out = run_benchmark(decoder, PROMPTS[:2], ["target_only", "llama_cpp"], 4, 64, 1, {"do_sample": False},
                        log=logged.append, llama_cpp={"server": str(tmp_path / "nope" / "llama-server")})
    assert list(out["rows"]) == ["target_only"]
    assert [m for m in logged if m.startswith("skip")] == [next(m for m in logged if "is not a file" in m)]


# ---------------------------------------------------------------------- the server wrapper
def test_request_body_greedy_and_sampling():
    greedy = completion_request([1, 2, 3], 8)
    assert greedy == {"prompt": [1, 2, 3], "n_predict": 8, "cache_prompt": False, "return_tokens": True,
                      "stream": False, "ignore_eos": False, "n_probs": 0, "temperature": 0.0,
                      "samplers": ["temperature"]}
    sampled = completion_request([4], 2, temperature=0.7, top_k=0, top_p=0.9, seed=5, ignore_eos=True)
    assert sampled["samplers"] == ["temperature", "top_k", "top_p"] and sampled["seed"] == 5
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"], sampled["ignore_eos"]) == (0.7, 0, 0.9, True)


def test_server_lifecycle_and_completion(fake):
    argv, record, model = fake
    server = LlamaServer(argv, model, threads=1, spec_type="ngram-simple",
                         extra_args=["--fake-record", str(record)], ready_timeout=30, request_timeout=10)
    with server:
        proc = server.process
        assert proc.poll() is None and 0 < server.port < 65536
        tokens, response = server.complete([5, 6, 7], 3)
        assert tokens == FIXED[:3] and response["stop_type"] == "limit"  # cut to n_predict
        tokens, _ = server.complete([5], 10, temperature=0.5, top_p=0.9, seed=1)
        assert tokens == FIXED
    assert proc.poll() is not None and server.process is None  # stopped on leaving the block
    start, = records(record, "start")
    argv_seen = start["argv"]
    assert argv_seen[argv_seen.index("-m") + 1] == str(model)
    assert argv_seen[argv_seen.index("--host") + 1] == "127.0.0.1"
    assert argv_seen[argv_seen.index("--port") + 1] == str(server.port)
    assert argv_seen[argv_seen.index("--spec-type") + 1] == "ngram-simple" and "-md" not in argv_seen
    first, second = records(record, "completion")
    assert first == completion_request([5, 6, 7], 3)  # exactly the documented body went over the wire
    assert second["samplers"] == ["temperature", "top_k", "top_p"] and second["seed"] == 1
    with pytest.raises(LlamaServerError, match="not running"):
        server.complete([1], 1)


def test_server_is_stopped_on_error_and_killed_when_it_ignores_terminate(fake):
    argv, record, model = fake
    server = LlamaServer(argv, model, threads=1, extra_args=["--fake-mode", "stubborn", "--fake-record", str(record)],
                         ready_timeout=30, stop_grace=1.0)
    with pytest.raises(RuntimeError, match="boom"), server:
        proc = server.process
        raise RuntimeError("boom")
    assert proc.poll() is not None  # terminate was ignored, so stop() killed it
    assert "--spec-type" not in records(record, "start")[0]["argv"]  # spec type none: no flag


def test_a_server_that_never_becomes_healthy_fails_clearly_within_the_wait(fake):
    argv, record, model = fake
    server = LlamaServer(argv, model, threads=1, extra_args=["--fake-mode", "never_healthy", "--fake-record", str(record)],
                         ready_timeout=1.5)
    t0 = time.monotonic()
    with pytest.raises(LlamaServerError, match=r"did not become healthy within 1.5 s .*HTTP 503"):
        server.start()
    assert time.monotonic() - t0 < 15
    assert server.process is None and gone(records(record, "start")[0]["pid"])  # and it was stopped
    crash = LlamaServer(argv, model, threads=1, extra_args=["--fake-mode", "crash"], ready_timeout=30)
    with pytest.raises(LlamaServerError, match="exited with code 3"):
        crash.start()


def test_llama_cpp_columns_in_run_benchmark_against_the_fake_server(fake):
    argv, record, model = fake
    decoder = target_only_decoder()
    logged = []
    settings = {"server": argv, "model": str(model), "spec_types": ["none", "ngram-simple", "draft-eagle3"],
                "threads": 1, "extra_args": ["--fake-record", str(record)], "ready_timeout_s": 30}
    out = run_benchmark(decoder, PROMPTS, ["target_only", "llama_cpp"], 4, 64, 1, {"do_sample": False},
                        log=logged.append, llama_cpp=settings)
    rows = out["rows"]
    assert list(rows) == ["target_only", "llama_cpp", "llama_cpp[ngram-simple]"]
    assert any(m.startswith("skip llama_cpp[draft-eagle3]") and "benchmark.llama_cpp.draft" in m for m in logged)
    for name in ("llama_cpp", "llama_cpp[ngram-simple]"):
        r = rows[name]
        assert r["new_tokens"] == 2 * 4 and r["phase_time_s"].keys() == {"outside"} and r["tau"] is None
        assert r["identical"] is not None and "speedup_vs_target_only" in r
    llama_records = [r for r in out["per_prompt"] if r["method"] == "llama_cpp"]
    assert all(r["new_tokens"] == 4 for r in llama_records)
    starts = records(record, "start")
    assert len(starts) == 2 and all(gone(s["pid"]) for s in starts)  # one server per spec type, both stopped
    bodies = records(record, "completion")
    assert len(bodies) == 2 * 3  # a warm-up and two timed prompts for each column
    ids = [decoder.encode_prompt(p["prompt"])[0].tolist() for p in PROMPTS]
    assert [b["prompt"] for b in bodies[::2]] == ids and all(b["temperature"] == 0.0 for b in bodies)
    console = Console(record=True, width=240)
    print_report(out, console)  # the column names are shown as they are, not read as rich markup
    assert console.export_text().count("llama_cpp[ngram-simple]") == 4  # overall, tok/s, speedup, phases
