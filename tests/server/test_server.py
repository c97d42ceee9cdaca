"""``ds4c serve`` over real HTTP on 127.0.0.1 (CPU, a small DeepSeek-V4 checkpoint with a tokenizer
and a chat template, compiled with ``ds4c compile --serving``).

Concurrent streaming requests get the tokens the Python engine gives them; clients that leave
mid-stream have their requests cancelled and their pages freed; a full queue answers 429; bad
requests get 400 with a message while the server goes on; SIGTERM drains in-flight streams."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from typer.testing import CliRunner

import ds4c
from ds4c.cli import app as cli
from ds4c.runtime.tokenizer import tokenizer_for
from ds4c.server import create_app
from tests.hf_configs import SMALL_CONFIGS, make_hf_model

WORDS = ["<unk>", "<bos>", "<eos>", "system", "user", "assistant"] + [f"w{i}" for i in range(6, 160)]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")
MODEL = "tinychat"


def _write_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(WORDS[:3])  # matched whole, before the pre-tokenizer splits "<bos>"
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<bos>", "eos_token": {"content": "<eos>"}}))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "ckpt"
    make_hf_model(SMALL_CONFIGS["mixed"], seed=3).save_pretrained(ckpt)
    _write_tokenizer(ckpt)
    out = root / f"{MODEL}.ds4"
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--target", "cpu", "--max-context", "256", "--serving",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


class LiveServer:
    """The app on uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="on"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.uvicorn.servers[0].sockets[0].getsockname()[1]}"

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def live(artifact):
    model = ds4c.load(artifact)
    engine = ds4c.Engine(model)
    server = LiveServer(create_app(engine, tokenizer_for(model), model_name=MODEL))
    yield server, engine
    server.stop()


def _wait_idle(engine, timeout=30.0):
    deadline = time.time() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and all(p["used"] == 0 for p in stats["pages"].values()):
            return stats
        assert time.time() < deadline, f"engine not idle: {stats}"
        time.sleep(0.05)


async def _stream(client, body, leave_after=None):
    """Token ids, finish reason and whether [DONE] came; ``leave_after`` chunks: disconnect then."""
    toks, reason, done, chunks = [], None, False, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choices = json.loads(line[6:])["choices"]
            if choices:
                toks += choices[0]["token_ids"]
                reason = choices[0]["finish_reason"] or reason
            chunks += 1
            if leave_after is not None and chunks >= leave_after:
                break  # leaving the block closes the connection mid-stream
    return toks, reason, done


def test_concurrent_streams_match_the_engine_and_leavers_free_their_pages(live, artifact):
    server, engine = live
    rng = random.Random(0)
    stay = [([rng.randrange(6, 160) for _ in range(rng.randint(1, 40))], rng.randint(2, 20)) for _ in range(24)]
    leave = [([rng.randrange(6, 160) for _ in range(rng.randint(1, 30))], 200) for _ in range(8)]
    expected = ds4c.Engine(artifact).generate([p for p, _ in stay],
                                              [ds4c.SamplingParams(max_new_tokens=n) for _, n in stay])
    finished_before = engine.stats()["finished"]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            jobs = [_stream(client, {"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0, "stream": True})
                    for p, n in stay]
            jobs += [_stream(client, {"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0, "stream": True,
                                      "ignore_eos": True}, leave_after=3) for p, n in leave]
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    for (toks, reason, done), want, (_, n) in zip(results[:24], expected, stay, strict=True):
        assert toks == want and done and reason == ("length" if len(want) == n else "stop")
    assert all(len(toks) < 200 and not done for toks, _, done in results[24:])
    stats = _wait_idle(engine)  # the leavers' requests were cancelled and every page came back
    assert stats["finished"] - finished_before == 32
    metrics = httpx.get(server.url + "/metrics").text
    assert re.search(r'ds4c_requests_total\{endpoint="completions",finish_reason="cancelled"\} 8\.0', metrics)
    assert re.search(r"ds4c_time_to_first_token_seconds_count \d+", metrics)
    assert 'ds4c_pages_used{pool="compressed"} 0.0' in metrics


def test_bad_requests_get_400_and_the_server_goes_on(live):
    server, engine = live
    url = server.url + "/v1/completions"
    good = {"model": MODEL, "prompt": [7, 8, 9], "max_tokens": 3, "temperature": 0}
    cases = {
        "not valid JSON": httpx.post(url, content=b"{bad json", headers={"content-type": "application/json"}),
        "not served here": httpx.post(url, json={**good, "model": "gpt-4"}),
        "max_tokens = -1": httpx.post(url, json={**good, "max_tokens": -1}),
        "temperature": httpx.post(url, json={**good, "temperature": -0.5}),
        "top_p": httpx.post(url, json={**good, "top_p": 0}),
        "prompt is empty": httpx.post(url, json={**good, "prompt": []}),
        "outside [0, 160)": httpx.post(url, json={**good, "prompt": [1, 999]}),
        "exceeds max_context=256": httpx.post(url, json={**good, "prompt": [7] * 250, "max_tokens": 10}),
        "prompt: int": httpx.post(url, json={**good, "prompt": 5}),
        "one prompt per request": httpx.post(url, json={**good, "prompt": ["w6", "w7"]}),
        "n = 2": httpx.post(url, json={**good, "n": 2}),
    }
    for needle, r in cases.items():
        assert r.status_code == 400, (needle, r.text)
        assert needle in r.json()["error"]["message"], (needle, r.json())
    r = httpx.post(url, json=good)
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 3
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 256
    _wait_idle(engine)


def test_chat_through_the_checkpoints_template_and_stop_strings(live, artifact):
    server, _ = live
    ids = {w: i for i, w in enumerate(WORDS)}
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "w9 w10 w11"}]
    prompt = [ids[w] for w in "<bos> system w7 w8 user w9 w10 w11 assistant".split()]
    want = ds4c.Engine(artifact).generate([prompt], ds4c.SamplingParams(max_new_tokens=12, stop_token_ids=[2]))[0]
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
                         "top_logprobs": 2}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert body["usage"]["prompt_tokens"] == len(prompt) and choice["token_ids"] == want
    text = " ".join(WORDS[t] for t in want if t != 2)
    assert choice["message"] == {"role": "assistant", "content": text}
    assert [c["token"] for c in choice["logprobs"]["content"]] == [WORDS[t] if t != 2 else "" for t in want]
    assert all(len(c["top_logprobs"]) == 2 for c in choice["logprobs"]["content"])
    # streamed: the same text in deltas, the role first
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0,
                            "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == text
    # a stop string cuts the text before it and finishes the request
    words = text.split()
    if len(words) >= 3:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0,
                             "stop": [" " + words[2]]})
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] == text[:text.index(" " + words[2])]
        assert choice["finish_reason"] == "stop"


def test_a_full_queue_answers_429_with_retry_after(artifact):
    engine = ds4c.Engine(artifact, max_running=1)
    model = engine.runner.model
    server = LiveServer(create_app(engine, tokenizer_for(model), model_name=MODEL, max_waiting=2))
    try:
        async def main():
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                body = {"model": MODEL, "prompt": [9, 9, 9], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(6)])

        responses = asyncio.run(main())
        codes = [r.status_code for r in responses]
        busy = [r for r in responses if r.status_code == 429]
        assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        assert busy and busy[0].headers["retry-after"] == "1" and "capacity" in busy[0].json()["error"]["message"]
        _wait_idle(engine)
    finally:
        server.stop()


def test_sigterm_drains_in_flight_streams_then_exits(artifact):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ds4c", "serve", str(artifact), "--port", "0", "--grace", "60",
                             "--model-name", MODEL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        line = ""
        deadline = time.time() + 120
        while "http://" not in line:
            assert time.time() < deadline and proc.poll() is None, line
            line = proc.stdout.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)
        got: dict = {}

        def client():
            body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 120, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            toks, done = [], False
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for ln in r.iter_lines():
                    if ln == "data: [DONE]":
                        done = True
                    elif ln.startswith("data: "):
                        toks += json.loads(ln[6:])["choices"][0]["token_ids"]
                        got["first"] = True
            got["toks"], got["done"] = toks, done

        t = threading.Thread(target=client)
        t.start()
        while "first" not in got:
            assert t.is_alive()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.TransportError):  # no new connections while draining
            httpx.get(url + "/health", timeout=5)
        t.join(120)
        assert got["done"] and len(got["toks"]) == 120  # the stream in flight finished
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_drives_a_running_server(live, tmp_path):
    from ds4c.bench.serve import make_workload

    server, engine = live
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(cli, ["bench", "serve", "--url", server.url, "--requests", "3", "--concurrency", "2",
                                   "--turns", "2", "--prompt-len", "4:10", "--output-len", "2:4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())["server"]
    work = make_workload(3, "4:10", "2:4", 160, max_context=256, concurrency=2, turns=2)
    assert report["requests"] == 6 and report["output_tokens"] == work.output_tokens
    assert report["ttft_s"]["p50"] > 0 and report["steps"] > 0
    assert report["prompt_tokens_computed"] == report["prompt_tokens"]  # this engine has no prefix cache
    _wait_idle(engine)
