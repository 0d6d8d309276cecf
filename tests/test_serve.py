"""`edgelm serve` driven by the official openai client over a real HTTP socket (uvicorn on a
free port in a thread), on tiny bundles: chat, streaming, completions, embeddings, structured
output, a tool call round trip, the prefix cache, auth, body limits and a client that leaves
mid-stream."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
from conftest import fast_export_options
from tiny_models import build_tiny_model

from edgelm.errors import PromptError

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
Tools:
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
Call one as <tool_call>
{"name": ..., "arguments": ...}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "member"],
    "additionalProperties": False,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`edgelm serve` in this process: the app the CLI builds, on uvicorn, on a real port."""

    def __init__(
        self,
        bundle: Path,
        fmt: str | None = None,
        api_key: str | None = None,
        max_body: int = 1 << 20,
        parallel: int = 1,
    ):
        import uvicorn

        from edgelm.serve.app import create_app
        from edgelm.serve.engine import ServedModel
        from edgelm.serve.metrics import ServerMetrics

        self.served = ServedModel(bundle, fmt, 1, ServerMetrics(), parallel=parallel)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            create_app(self.served, api_key=api_key, max_body=max_body),
            host="127.0.0.1",
            port=self.port,
            log_level="error",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def metric(self, name: str, headers: dict | None = None) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=headers).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    def reference(self):
        """The same artifact loaded separately: the served session belongs to the server's worker
        (its prefix cache knows what that session holds; a call beside it would change that)."""
        import edgelm

        if not hasattr(self, "_reference"):
            self._reference = edgelm.load(self.served.bundle, format=self.served.model.artifact.name, verify=False)
        return self._reference

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    running = Server(tiny_bundle, "onnx")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from edgelm.export import export_bundle

    folder = build_tiny_model("qwen2", tmp_path_factory.mktemp("tool-model"), initializer_range=0.2, ascii_vocab=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOL_TEMPLATE
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    bundle = tmp_path_factory.mktemp("tool-bundle") / "tiny-tools"
    export_bundle(
        folder, bundle, fast_export_options(formats=("onnx",), quants=("fp32",), profile=False, vendor_check=False)
    )
    running = Server(bundle)
    yield running
    running.stop()


def _model(server: Server) -> str:
    return server.served.id


def test_chat_streaming_and_not_give_the_same_greedy_text_and_count_tokens(server):
    client = server.client()
    models = client.models.list().data
    assert [m.id for m in models] == [_model(server)]
    messages = [{"role": "user", "content": "What is a KV cache?"}]
    whole = client.chat.completions.create(model=_model(server), messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5
    stream = client.chat.completions.create(
        model=_model(server),
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    completion = client.completions.create(model=_model(server), prompt="The cache", max_tokens=5, temperature=0)
    assert completion.choices[0].text == server.reference().generate("The cache", chat=False, max_new_tokens=5)


def test_the_served_text_is_edgelms_own(server):
    """Server overhead aside, the server runs edgelm's loop: same greedy text as edgelm.load(...).generate."""
    answer = server.client().chat.completions.create(
        model=_model(server), messages=[{"role": "user", "content": "Hello there"}], max_tokens=10, temperature=0
    )
    assert answer.choices[0].message.content == server.reference().generate("Hello there", max_new_tokens=10)


def test_json_schema_output_validates_for_20_prompts(server):
    client = server.client()
    form = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for i in range(20):
        answer = client.chat.completions.create(
            model=_model(server),
            messages=[{"role": "user", "content": f"Describe person number {i} as JSON."}],
            response_format=form,
            max_tokens=120,
            temperature=0.8,
            seed=i,
        )
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        jsonschema.validate(json.loads(answer.choices[0].message.content), PERSON)
    anything = client.chat.completions.create(
        model=_model(server),
        messages=[{"role": "user", "content": "JSON"}],
        response_format={"type": "json_object"},
        max_tokens=120,
    )
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    digits = client.completions.create(
        model=_model(server), prompt="A number:", max_tokens=10, extra_body={"regex": "[0-9]{3}-[0-9]{2}"}
    )
    assert len(digits.choices[0].text) == 6 and digits.choices[0].text[3] == "-"


def test_a_tool_call_round_trip(tool_server):
    client = tool_server.client()
    model = _model(tool_server)
    messages = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]
    first = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"celsius": 4})},
    ]
    second = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = tool_server.served.tokenizer.apply_chat_template(
        [m if isinstance(m, dict) else m for m in _for_template(messages)], tools=[WEATHER]
    )
    assert "<tool_response>" in rendered and '"get_weather"' in rendered
    assert second.usage.prompt_tokens == len(tool_server.served.tokenizer.encode(rendered, add_special_tokens=False))
    streamed = list(
        client.chat.completions.create(
            model=model, messages=messages[:1], tools=[WEATHER], tool_choice="required", max_tokens=80, stream=True
        )
    )
    calls = [c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls]
    assert calls and calls[0][0].function.name == "get_weather"


def _for_template(messages):
    from edgelm.serve.requests import Message

    return [Message(**m).for_template() for m in messages]


def test_tools_on_a_template_without_tool_support_are_a_clear_400(server):
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        server.client().chat.completions.create(
            model=_model(server), messages=[{"role": "user", "content": "hi"}], tools=[WEATHER], max_tokens=4
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n": 2}, "n > 1 is not supported"),
        ({"frequency_penalty": 0.5}, "repetition_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": -1}, "temperature"),
        ({"extra_body": {"mystery": 1}}, "mystery"),
        ({"response_format": {"type": "yaml"}}, "not supported"),
        ({"messages": [{"role": "user", "content": "x " * 5000}]}, "context holds"),
    ],
)
def test_requests_edgelm_cannot_honour_are_refused_with_a_reason(server, settings, message):
    body = {"model": _model(server), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **settings}
    with pytest.raises(openai.BadRequestError, match=message):
        server.client().chat.completions.create(**body)


def test_another_models_name_is_404_and_errors_carry_no_trace(server):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    answer = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert answer.status_code == 400 and "Traceback" not in answer.text and answer.json()["error"]["message"]


def test_the_prefix_cache_reuses_a_resent_history_and_changes_nothing(server):
    client = server.client()
    history = [{"role": "user", "content": "Tell me about caches."}]
    previous_prompt = 0
    for turn in range(4):
        answer = client.chat.completions.create(model=_model(server), messages=history, max_tokens=6, temperature=0)
        cached = answer.usage.prompt_tokens_details.cached_tokens
        if turn:
            assert cached >= previous_prompt, (
                turn,
                cached,
                previous_prompt,
            )  # the whole last prompt came from the cache
        reply = answer.choices[0].message.content
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And {turn}?"}]
        previous_prompt = answer.usage.prompt_tokens
    fresh = server.reference().generate(
        server.served.tokenizer.apply_chat_template(history), chat=False, max_new_tokens=6
    )  # from an empty cache, without the server
    last = client.chat.completions.create(model=_model(server), messages=history, max_tokens=6, temperature=0)
    assert last.choices[0].message.content == fresh


def test_every_runtime_can_cut_its_cache_back_to_a_prefix(tiny_bundle):
    import edgelm
    from edgelm.bundle import read_bundle

    ids = np.arange(3, 40, dtype=np.int64)
    for entry in read_bundle(tiny_bundle).artifacts:
        session = edgelm.load(tiny_bundle, format=entry.name, verify=False).session()
        whole = session.prefill(ids)
        session.reset()
        session.prefill(ids[:25])
        session.decode(7)  # a different continuation, then cut back to the shared 20
        session.truncate(20)
        cut = session.prefill(ids[20:])
        assert np.abs(cut[-1] - whole[-1]).max() <= 1e-3 * max(1.0, np.abs(whole[-1]).max()), entry.name
        session.close()


def _gguf_artifact(bundle: Path) -> Path:
    from edgelm.bundle import read_bundle

    entry = next(e for e in read_bundle(bundle).artifacts if e.format == "gguf")
    return bundle / entry.path


@pytest.mark.parametrize("isolated", [False, True])
def test_a_llamacpp_batch_steps_sequences_together_as_separate_sessions_would(tiny_bundle, isolated):
    from edgelm.isolation import mark_trusted, open_isolated
    from edgelm.runtimes.llamacpp import ADAPTER

    path = _gguf_artifact(tiny_bundle)
    mark_trusted(path)  # the single session and the in-process batch open it here
    single = ADAPTER.open(path, threads=1)
    if isolated:
        batch = open_isolated("llama.cpp", path, threads=1, sequences=3)
    else:
        batch = ADAPTER.open_batch(path, 3, threads=1)
    assert type(batch).__name__ == ("IsolatedBatch" if isolated else "LlamaCppBatch")
    prompts = [np.arange(3, 3 + n, dtype=np.int64) * (k + 1) % 200 for k, n in enumerate((17, 5, 30))]
    steps = [[7, 11, 13], [5, 9, 2], [1, 4, 8]]  # each sequence's next three tokens

    def alone(prompt, tokens):
        single.reset()
        out = [single.prefill(prompt)[-1]]
        return out + [single.decode(t) for t in tokens]

    expected = [alone(p, t) for p, t in zip(prompts, steps)]
    got = [[row] for row in batch.step(list(enumerate(prompts)))]
    for i in range(3):
        for seq, row in enumerate(batch.step([(seq, np.array([steps[seq][i]])) for seq in range(3)])):
            got[seq].append(row)
    for seq in range(3):
        for want, have in zip(expected[seq], got[seq]):
            assert np.abs(have - want).max() <= 1e-3 * max(1.0, np.abs(want).max()), seq
    batch.truncate(2, 10)  # one sequence cut back and continued; the others are untouched
    cut = batch.step([(2, prompts[2][10:]), (0, np.array([3]))])
    single.reset()
    assert np.abs(cut[0] - single.prefill(prompts[2])[-1]).max() <= 1e-3 * max(1.0, np.abs(cut[0]).max())
    single.reset()
    single.prefill(prompts[0])
    for token in [*steps[0], 3]:
        reference = single.decode(token)
    assert np.abs(cut[1] - reference).max() <= 1e-3 * max(1.0, np.abs(reference).max())
    with pytest.raises(PromptError):
        batch.step([(0, np.array([10**6]))])
    with pytest.raises(ValueError):  # more ids than one llama_decode takes: refused, not written past the batch
        batch.step([(0, np.ones(batch.n_batch, dtype=np.int64)), (1, np.array([3]))])
    with pytest.raises(ValueError):
        batch.step([(0, np.array([3])), (0, np.array([4]))])
    single.close()
    batch.close()


def test_concurrent_requests_on_a_gguf_are_batched_and_each_gets_its_own_text(tiny_bundle):
    running = Server(tiny_bundle, "gguf", parallel=3)
    try:
        client, model = running.client(), _model(running)
        prompts = ["Tell me a story.", "Count to ten.", "What is a cache?"]

        start = threading.Barrier(3)

        def ask(prompt, together=False):
            if together:  # the tiny model answers in milliseconds: start the three at once
                start.wait(timeout=60)
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=64,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        alone = [ask(p) for p in prompts]  # one at a time: nothing to batch
        steps_alone = running.metric("edgelm_batch_sequences_count")  # runtime steps, from /metrics
        sequences_alone = running.metric("edgelm_batch_sequences_sum")  # and the sequences they carried
        results: dict[int, str] = {}

        def ask_together(i):
            results[i] = ask(prompts[i], together=True)

        threads = [threading.Thread(target=ask_together, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert [results[i] for i in range(3)] == alone  # greedy: the same text, batched or not
        together = running.metric("edgelm_batch_sequences_count") - steps_alone
        assert together < 0.7 * steps_alone, (together, steps_alone)  # most steps carried several sequences
        assert sequences_alone == steps_alone  # one at a time: one sequence a step
        # batching regroups the same work: each request ran as many steps as it did alone
        assert running.metric("edgelm_batch_sequences_sum") - sequences_alone == sequences_alone
        assert running.metric("edgelm_active_sessions") == 0
    finally:
        running.stop()


def test_a_batched_server_keeps_each_conversation_in_its_own_slot(tiny_bundle):
    running = Server(tiny_bundle, "gguf", parallel=2)
    try:
        client, model = running.client(), _model(running)
        chats = {name: [{"role": "user", "content": f"Hello, I am {name}."}] for name in ("ann", "bob")}
        prompt_tokens = {}
        for turn in range(3):
            for name, history in chats.items():  # two conversations, turn by turn
                answer = client.chat.completions.create(model=model, messages=history, max_tokens=5, temperature=0)
                if turn:
                    assert answer.usage.prompt_tokens_details.cached_tokens >= prompt_tokens[name], (name, turn)
                prompt_tokens[name] = answer.usage.prompt_tokens
                history += [
                    {"role": "assistant", "content": answer.choices[0].message.content},
                    {"role": "user", "content": "Go on."},
                ]
    finally:
        running.stop()


def test_an_api_key_guards_every_route_but_health(tiny_bundle, tmp_path):
    running = Server(tiny_bundle, "gguf", api_key="s3cret-key")
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
        assert httpx.get(f"{running.url}/metrics").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert running.client("s3cret-key").models.list().data[0].id == _model(running)
    finally:
        running.stop()


def test_oversize_bodies_are_413_before_they_are_read(server):
    big = b'{"model": "x", "messages": [{"role": "user", "content": "' + b"a" * (2 << 20) + b'"}]}'
    assert httpx.post(f"{server.url}/v1/chat/completions", content=big).status_code == 413

    def chunks():
        for _ in range(40):
            yield b"a" * 65536

    answer = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"


def test_a_client_that_leaves_mid_stream_frees_the_model_at_once(server):
    before = server.metric("edgelm_completion_tokens_total")
    body = {
        "model": _model(server),
        "messages": [{"role": "user", "content": "Go on and on."}],
        "max_tokens": 200,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
    started = time.perf_counter()
    answer = server.client().completions.create(model=_model(server), prompt="Next", max_tokens=2)
    assert answer.choices[0].text is not None
    deadline = time.time() + 10
    while server.metric("edgelm_active_sessions") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.metric("edgelm_active_sessions") == 0
    assert server.metric("edgelm_completion_tokens_total") - before < 200  # the stream stopped early
    assert time.perf_counter() - started < 30


def test_embeddings_from_an_encoder_bundle_match_the_python_api(tiny_model_factory, tmp_path_factory):
    import edgelm
    from edgelm.export import export_bundle

    bundle = tmp_path_factory.mktemp("serve-encoder") / "bert"
    export_bundle(tiny_model_factory("bert"), bundle, fast_export_options(formats=("onnx",), quants=("fp32",)))
    running = Server(bundle)
    try:
        client = running.client()
        got = client.embeddings.create(model=_model(running), input=["a cache", "a phone"])
        expected = edgelm.load(bundle).embed(["a cache", "a phone"])
        assert np.abs(np.array([d.embedding for d in got.data]) - expected).max() <= 1e-5
        with pytest.raises(openai.BadRequestError, match="encoder"):
            client.chat.completions.create(model=_model(running), messages=[{"role": "user", "content": "hi"}])
    finally:
        running.stop()


def test_the_cli_serves_a_bundle_and_refuses_bad_options_with_exit_2(tiny_bundle, tmp_path):
    import subprocess
    import sys

    refused = subprocess.run(
        [sys.executable, "-m", "edgelm", "serve", str(tiny_bundle), "--api-key-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        refused.returncode == 2 and "--api-key-file" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    )
    key = tmp_path / "key"
    key.write_text("k-123\n")
    port = _free_port()
    command = [sys.executable, "-m", "edgelm", "serve", str(tiny_bundle), "-f", "gguf", "--port", str(port)]
    process = subprocess.Popen([*command, "--api-key-file", str(key)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k-123", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                models = client.models.list().data
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.time() < deadline, process.stderr.read()
                time.sleep(0.3)
        answer = client.completions.create(model=models[0].id, prompt="Hello", max_tokens=3)
        assert answer.usage.completion_tokens <= 3
    finally:
        process.terminate()
        process.wait(timeout=30)
