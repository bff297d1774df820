"""`tunelab serve`: a tiny model behind the OpenAI-compatible API, talked to with the official `openai` client."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tunelab import modeling, synthetic
from tunelab.cli import main
from tunelab.config import GenerationConfig, TinyModelConfig

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "tiny.yaml"  # generation: 24 new tokens, batches of 16, greedy (the model's default)
KEY = "sk-test-do-not-log-7f3a9c"
INSTRUCTIONS = [r["instruction"] + (f" {r['input']}" if r["input"] else "") for r in synthetic.alpaca_records(16, seed=5)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved tiny random-weight Qwen2 with its BPE tokenizer, as a merged model directory is laid out."""
    out = tmp_path_factory.mktemp("served")
    records = synthetic.alpaca_records(300)
    tokenizer = modeling.train_tiny_tokenizer(synthetic.generic_text(100) + [r["instruction"] + r["output"]
                                                                            for r in records], vocab_size=512)
    modeling.build_tiny_model(TinyModelConfig(), tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(model: Path, log: Path, env: dict | None = None, *extra: str):
    port = _free_port()
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--config", str(STUDY), "--model",
                                str(model), "--port", str(port), *extra], env=environment,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not come up in 2 minutes")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    process, base = _start(model_dir, log)
    yield base, log
    process.terminate()
    process.wait(timeout=30)


def _client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=900)


def _metric(base: str, name: str) -> float:
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.split("{")[0].split(" ")[0] == name
               and not line.startswith("#"))


def _generate(model: Path, capsys) -> list[str]:
    args = ["generate", "--config", str(STUDY), "--model", str(model)]
    for instruction in INSTRUCTIONS:
        args += ["--prompt", instruction]
    assert main(args) == 0
    return [json.loads(line)["answer"] for line in capsys.readouterr().out.strip().splitlines()]


def test_answers_equal_tunelab_generate_one_at_a_time_and_16_at_once(server, model_dir, capsys):
    base, _ = server
    expected = _generate(model_dir, capsys)
    client = _client(base)
    assert [m.id for m in client.models.list().data] == [str(model_dir)]

    def chat(instruction: str) -> str:
        reply = client.chat.completions.create(model=str(model_dir), temperature=0,
                                               messages=[{"role": "user", "content": instruction}])
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        return reply.choices[0].message.content.strip()

    one_at_a_time = [chat(i) for i in INSTRUCTIONS]
    with ThreadPoolExecutor(16) as pool:
        at_once = list(pool.map(chat, INSTRUCTIONS))
    assert one_at_a_time == expected
    assert at_once == expected
    assert _metric(base, "tunelab_batch_size_count") < 2 * len(INSTRUCTIONS)  # the 16 did not run one by one


def test_streaming_equals_the_whole_answer(server, model_dir):
    base, _ = server
    client = _client(base)
    messages = [{"role": "system", "content": "ignored without a chat template"},
                {"role": "user", "content": INSTRUCTIONS[0]}]
    whole = client.chat.completions.create(model=str(model_dir), messages=messages, temperature=0)
    chunks = list(client.chat.completions.create(model=str(model_dir), messages=messages, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it arrived in pieces
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    prompt = _client(base).completions.create(model=str(model_dir), prompt="Sort the numbers", max_tokens=10,
                                              temperature=0)
    streamed = _client(base).completions.create(model=str(model_dir), prompt="Sort the numbers", max_tokens=10,
                                                temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == prompt.choices[0].text
    assert prompt.usage.completion_tokens <= 10


def test_stop_n_seed_and_usage(server, model_dir):
    base, _ = server
    client = _client(base)
    full = client.completions.create(model=str(model_dir), prompt="Repeat the words", max_tokens=16, temperature=0)
    text = full.choices[0].text
    assert len(text) > 4, text
    stop = text[2:4]
    cut = client.completions.create(model=str(model_dir), prompt="Repeat the words", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=str(model_dir), prompt="Repeat the words", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    sampled = [client.completions.create(model=str(model_dir), prompt="Add", max_tokens=12, temperature=1.0, n=2,
                                         seed=7) for _ in range(2)]
    assert len(sampled[0].choices) == 2 and [c.index for c in sampled[0].choices] == [0, 1]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # same seed, same answers
    assert sampled[0].usage.prompt_tokens > 0 and sampled[0].usage.total_tokens == (
        sampled[0].usage.prompt_tokens + sampled[0].usage.completion_tokens)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, model_dir):
    base, _ = server
    client = _client(base)
    model = str(model_dir)
    bad_json = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and"):
        client.completions.create(model=model, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and"):
        client.completions.create(model=model, prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="context length of 2048"):
        client.completions.create(model=model, prompt="word " * 2100, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="'logprobs' is not supported"):
        client.completions.create(model=model, prompt="hi", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="'presence_penalty' is not supported"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="role 'user'"):
        client.chat.completions.create(model=model, messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=model, messages=[])
    assert httpx.get(f"{base}/health").json()["status"] == "ok"
    assert client.completions.create(model=model, prompt="hi", max_tokens=2).choices[0].finish_reason
    assert _metric(base, "tunelab_requests_total") > 0


def test_api_key_is_required_and_never_logged(model_dir, tmp_path):
    log = tmp_path / "server.log"
    process, base = _start(model_dir, log, {"TUNELAB_API_KEY": KEY})
    try:
        model = str(model_dir)
        for key in ("wrong-key", ""):
            with pytest.raises(openai.AuthenticationError) as caught:
                _client(base, key or "x").completions.create(model=model, prompt="hi", max_tokens=2)
            assert KEY not in str(caught.value.body)
        missing = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi"})
        assert missing.status_code == 401 and KEY not in missing.text
        reply = _client(base, KEY).completions.create(model=model, prompt="hi", max_tokens=2)
        assert reply.choices[0].text is not None
        bad = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"model": model, "prompt": "hi", "max_tokens": -1})
        assert bad.status_code == 400 and KEY not in bad.text
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "401" in log.read_text() and KEY not in log.read_text()


def test_a_full_queue_gets_503(model_dir):
    from fastapi.testclient import TestClient

    from tunelab.generation import Engine
    from tunelab.serve.api import Server, build_app

    engine = Engine.load(model_dir, GenerationConfig(max_new_tokens=4))
    server = Server(engine, "tiny", api_key=None, max_queue=2)  # batcher not started: nothing leaves the queue
    client = TestClient(build_app(server))
    answer = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "n": 3})
    assert answer.status_code == 503 and "busy" in answer.json()["error"]["message"]


def test_load_batches_concurrent_requests(server, model_dir, tmp_path):
    """64 concurrent clients x 4 requests on loopback: throughput and latency recorded; from /metrics,
    batches larger than one served and fewer model calls and forward passes than unbatched serving needs."""
    base, _ = server
    batches0, passes0 = _metric(base, "tunelab_batches_total"), _metric(base, "tunelab_forward_passes_total")
    tokens0 = _metric(base, "tunelab_generated_tokens_total")
    client = _client(base)

    def user(index: int) -> list[float]:
        seconds = []
        for request in range(4):
            began = time.perf_counter()
            client.completions.create(model=str(model_dir), prompt=INSTRUCTIONS[(index + request) % 16],
                                      max_tokens=8, temperature=0)
            seconds.append(time.perf_counter() - began)
        return seconds

    began = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        latencies = sorted(s for user_seconds in pool.map(user, range(64)) for s in user_seconds)
    wall = time.perf_counter() - began
    batches = _metric(base, "tunelab_batches_total") - batches0
    passes = _metric(base, "tunelab_forward_passes_total") - passes0
    tokens = _metric(base, "tunelab_generated_tokens_total") - tokens0
    record = {"requests": len(latencies), "seconds": wall, "requests_per_second": len(latencies) / wall,
              "generated_tokens_per_second": tokens / wall, "latency_p50_seconds": statistics.median(latencies),
              "latency_p95_seconds": latencies[int(0.95 * (len(latencies) - 1))], "batches": batches,
              "forward_passes": passes}
    print("load test:", json.dumps(record))  # recorded, not asserted: this machine is shared
    (tmp_path / "load.json").write_text(json.dumps(record))
    lines = httpx.get(f"{base}/metrics").text.splitlines()
    single = float(next(line.split()[-1] for line in lines if line.startswith('tunelab_batch_size_bucket{le="1"}')))
    assert _metric(base, "tunelab_batch_size_count") - single > 0  # batches larger than one were served
    assert batches < len(latencies)
    assert passes < tokens  # one request at a time would need a forward pass per generated token
