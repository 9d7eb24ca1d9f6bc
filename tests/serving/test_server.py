"""The OpenAI-compatible server, talked to with the official ``openai`` client on 127.0.0.1:
answers equal ``peftjax.generate`` with the named adapter, streaming and not; many concurrent
clients on mixed adapters; bad input gets a 4xx and the server keeps serving; adapters load and
unload at run time; ``peftjax serve`` shuts down gracefully."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from flax import nnx

from peftjax.generation import generate
from peftjax.models import from_pretrained
from peftjax.serving import Engine
from peftjax.serving._server import create_app
from peftjax.tokenizer import load_tokenizer
from peftjax.tuners import (IA3Config, LoraConfig, PromptTuningConfig, get_peft_model,
                            load_adapter)
from tests.conftest import REPO

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

BASE = "tiny-base"
ADAPTERS = {
    "lora_a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                         init_lora_weights=False),
    "lora_b": LoraConfig(r=2, lora_alpha=2, use_rslora=True, target_modules="all-linear",
                         init_lora_weights=False),
    "ia3": IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                     init_ia3_weights=False),
    "prompt": PromptTuningConfig(num_virtual_tokens=3),
}
PROMPTS = ["The movie was", "Review: dull and long. Sentiment:", "Hello there, how are you today",
           "A"]


class LiveServer:
    """uvicorn serving ``app`` on a free port of 127.0.0.1, in a thread (bounded start/stop)."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start within 60 s"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                             timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def setup(tiny_llama_with_real_tokenizer, tmp_path_factory):
    path = tiny_llama_with_real_tokenizer
    base = from_pretrained(path, progress=False)
    tok = load_tokenizer(path)
    root = tmp_path_factory.mktemp("served")
    dirs = {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        get_peft_model(nnx.clone(base), cfg, rngs=nnx.Rngs(i + 1)).save_pretrained(
            str(root / name))
        dirs[name] = str(root / name)
    engine = Engine(base, adapters=dirs, max_batch=4, max_len=96, bank_slots=3, bucket=16)
    live = LiveServer(create_app(engine, tok, model_name=BASE))
    yield dict(base=base, tok=tok, dirs=dirs, engine=engine, live=live, path=path, root=root)
    live.close()


def expected(setup, adapter, prompts_ids, max_tokens) -> list[str]:
    """What ``peftjax.generate`` gives (greedy) with ``adapter`` alone, as text."""
    base, tok = setup["base"], setup["tok"]
    model = base if adapter in (None, BASE) else load_adapter(nnx.clone(base),
                                                              setup["dirs"][adapter], adapter)
    g = generate(model, prompts_ids, tokenizer=tok, max_new_tokens=max_tokens, bucket=16)
    return g.texts


def ids_of(tok, prompt: str) -> list[int]:
    return tok(prompt)["input_ids"]


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_completions_and_chat_equal_generate(setup):
    client, tok = setup["live"].client(), setup["tok"]
    assert [m.id for m in client.models.list().data] == [BASE, "ia3", "lora_a", "lora_b",
                                                         "prompt"]
    want = expected(setup, "lora_a", [ids_of(tok, PROMPTS[0])], 8)[0]
    got = client.completions.create(model="lora_a", prompt=PROMPTS[0], max_tokens=8,
                                    temperature=0)
    assert got.choices[0].text == want and got.model == "lora_a"
    assert got.usage.prompt_tokens == len(ids_of(tok, PROMPTS[0]))
    assert got.usage.completion_tokens == 8 and got.choices[0].finish_reason == "length"
    # streamed completion: the pieces add up to the same text
    chunks = list(client.completions.create(model="lora_a", prompt=PROMPTS[0], max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want and len(chunks) > 3
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    # chat, through the tokenizer's chat template, streaming and not
    want_chat = expected(setup, "lora_b", [chat_ids(tok, PROMPTS[1])], 10)[0]
    messages = [{"role": "user", "content": PROMPTS[1]}]
    got = client.chat.completions.create(model="lora_b", messages=messages, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.content == want_chat
    assert got.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="lora_b", messages=messages,
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_chat
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # stop: the text ends before the first stop string
    cut = want_chat[len(want_chat) // 2:len(want_chat) // 2 + 3]
    got = client.chat.completions.create(model="lora_b", messages=messages, max_tokens=10,
                                         temperature=0, stop=[cut])
    assert got.choices[0].message.content == want_chat[:want_chat.index(cut)]
    assert got.choices[0].finish_reason == "stop"
    # seeded sampling repeats; the base model by its name
    a, b = (client.completions.create(model="ia3", prompt=PROMPTS[2], max_tokens=8,
                                      temperature=1.0, top_p=0.9, seed=11).choices[0].text
            for _ in range(2))
    assert a == b
    got = client.completions.create(model=BASE, prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(setup, None, [ids_of(tok, PROMPTS[3])], 6)[0]


def test_many_concurrent_clients_on_mixed_adapters(setup):
    """40 requests from 8 client threads over the base and four adapters (more than the
    engine's 4 rows and 2 adapter slots): every answer is the one its adapter gives alone."""
    tok, live = setup["tok"], setup["live"]
    models = [BASE, "lora_a", "lora_b", "ia3", "prompt"]
    want = {m: dict(zip(PROMPTS, expected(setup, m, [ids_of(tok, p) for p in PROMPTS], 6)))
            for m in models}
    jobs = [(models[i % 5], PROMPTS[(i // 5) % 4]) for i in range(40)]
    client = live.client()

    def ask(job):
        model, prompt = job
        return client.completions.create(model=model, prompt=prompt, max_tokens=6,
                                         temperature=0).choices[0].text
    before = dict(setup["engine"].stats)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs, timeout=300))
    assert len(answers) == 40
    for (model, prompt), text in zip(jobs, answers):
        assert text == want[model][prompt], (model, prompt)
    stats = setup["engine"].stats
    assert stats["finished_length"] + stats["finished_stop"] - before.get(
        "finished_length", 0) - before.get("finished_stop", 0) == 40


def test_bad_requests_get_4xx_and_the_server_keeps_serving(setup):
    client, url = setup["live"].client(), setup["live"].url
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="exceeds the engine's max_len"):
        client.completions.create(model="lora_a", prompt="word " * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature must lie in"):
        client.completions.create(model="lora_a", prompt="hi", temperature=5)
    with pytest.raises(openai.BadRequestError, match="only n = 1"):
        client.completions.create(model="lora_a", prompt="hi", n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens must lie in"):
        client.completions.create(model="lora_a", prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match=r"unrecognized request arguments \['frob"):
        client.completions.create(model="lora_a", prompt="hi", extra_body={"frob": 1})
    with pytest.raises(openai.BadRequestError, match="presence_penalty is not supported"):
        client.completions.create(model="lora_a", prompt="hi", presence_penalty=0.5)
    with pytest.raises(openai.BadRequestError, match="messages must be"):
        client.chat.completions.create(model="lora_a", messages=[{"role": "user"}])
    for body in (b"{not json", b"[1, 2]", json.dumps({"model": "lora_a"}).encode()):
        r = httpx.post(url + "/v1/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, body
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/v1/nothing-here", timeout=30).status_code == 404
    # still serving
    got = client.completions.create(model="lora_a", prompt="hi", max_tokens=3, temperature=0)
    assert got.usage.completion_tokens >= 1 and httpx.get(url + "/health").json()["status"] == "ok"


def test_adapters_load_and_unload_at_run_time(setup):
    client, url, tok = setup["live"].client(), setup["live"].url, setup["tok"]
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], init_lora_weights=False)
    new_dir = str(setup["root"] / "late")
    get_peft_model(nnx.clone(setup["base"]), cfg, rngs=nnx.Rngs(9)).save_pretrained(new_dir)
    r = httpx.post(url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "late", "lora_path": new_dir})
    assert r.status_code == 200, r.text
    assert "late" in [m.id for m in client.models.list().data]
    setup["dirs"]["late"] = new_dir
    got = client.completions.create(model="late", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(setup, "late", [ids_of(tok, PROMPTS[0])], 6)[0]
    r = httpx.post(url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "broken", "lora_path": str(setup["root"] / "missing")})
    assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="hi", max_tokens=2)
    r = httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
    assert r.status_code == 404


def test_serve_command_with_yaml_and_graceful_shutdown(setup, tmp_path):
    """``peftjax serve SETTINGS.yaml --adapter ...`` starts; on SIGTERM a request in flight
    finishes (all its tokens), then the process exits 0 and the port is closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = tmp_path / "serve.yaml"
    settings.write_text(f"model: {setup['path']}\nserved_model_name: {BASE}\nmax_len: 96\n"
                        f"adapters:\n  lora_a: {setup['dirs']['lora_a']}\n")
    proc = subprocess.Popen([sys.executable, "-m", "peftjax.cli", "serve", str(settings),
                             "--adapter", f"ia3={setup['dirs']['ia3']}", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "peftjax serve did not come up within 180 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [BASE, "ia3", "lora_a"]
        stream = client.completions.create(model="lora_a", prompt=PROMPTS[0], max_tokens=40,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        first = next(it)
        proc.send_signal(signal.SIGTERM)  # in flight: it must still finish
        rest = list(it)
        assert (rest or [first])[-1].choices[0].finish_reason in ("length", "stop")
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        want = expected(setup, "lora_a", [ids_of(setup["tok"], PROMPTS[0])], 40)[0]
        assert text == want
        assert proc.wait(timeout=120) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_text_pieces_add_up_to_the_decoded_text(setup):
    """The incremental detokenizer: pieces join to exactly ``decode(all tokens)`` (characters
    split across byte tokens included), and a stop string that spans tokens ends the text
    before it without sending any of it."""
    from peftjax.serving._server import _Text
    tok = setup["tok"]
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    ids = tok("Café 😀 naïve — déjà vu, 東京 ok")["input_ids"]
    whole = decode(ids)
    text = _Text(decode, [])
    pieces = [text.add(t) for t in ids] + [text.close()]
    assert "".join(pieces) == whole and sum(1 for p in pieces if p) > 5
    text = _Text(decode, ["ïve —"])
    pieces = [text.add(t) for t in ids] + [text.close()]
    assert "".join(pieces) == whole[:whole.index("ïve —")] and text.stopped
