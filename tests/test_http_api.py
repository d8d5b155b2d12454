"""The OpenAI-compatible HTTP front door, driven by the official `openai` client against a real
server on loopback: greedy tokens equal peft's, as through gRPC; streaming equals the whole
answer; errors arrive as the client's own exception classes with OpenAI error objects; keys,
tenants and disconnects behave as on gRPC."""

import concurrent.futures as cf
import json

import httpx2 as httpx
import openai
import pytest

from conftest import ADAPTERS, PROMPTS, eventually
from loramux.server.app import BackgroundServer
from loramux.server.tenancy.keys import append_key

N = 8


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    keys = tmp_path_factory.mktemp("http-keys") / "keys.yaml"
    users = {"default": append_key(keys, "default", "admin", "http"), "other": append_key(keys, "other", "user", "http")}
    settings = assets.settings(http_port=0, auth="keys", auth_keys_file=keys, adapter_slots=5)
    with BackgroundServer(settings) as srv:
        for name in ADAPTERS:
            srv.engine.load_adapter("default", name, name)
        srv.keys = users
        srv.base_url = f"http://127.0.0.1:{srv.running.http_port}/v1"
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=server.keys["default"], max_retries=0, timeout=60) as c:
        yield c


def text_of(assets, ids):
    return assets.tokenizer.decode(ids, skip_special_tokens=True)


def test_completions_equal_peft_for_every_adapter_and_the_base_in_mixed_batches(assets, server, client):
    base = server.engine.settings.public_model_name
    jobs = [(a, p) for p in PROMPTS for a in [base, *ADAPTERS]]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:  # one mixed batch
        answers = list(pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=N, temperature=0),
                                jobs))
    for (model, prompt), answer in zip(jobs, answers):
        expected = assets.oracle(None if model == base else model, prompt, N)
        choice = answer.choices[0]
        assert choice.text == text_of(assets, expected), (model, prompt)
        assert answer.model == model and answer.object == "text_completion"
        assert answer.usage.completion_tokens == len(expected)
        assert answer.usage.prompt_tokens == len(assets.tokenizer(prompt)["input_ids"])
        assert choice.finish_reason == ("stop" if expected[-1] == assets.tokenizer.eos_token_id else "length")


def test_streamed_completion_equals_the_whole_one_and_reports_usage(assets, client):
    whole = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    chunks = list(client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=N, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completions_apply_the_template_and_stream(assets, client):
    messages = [{"role": "user", "content": "the quick brown"}]
    rendered = assets.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = assets.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    whole = client.chat.completions.create(model="all-r16", messages=messages, max_tokens=N, temperature=0)
    expected = client.completions.create(model="all-r16", prompt=list(ids), max_tokens=N, temperature=0)
    assert whole.choices[0].message.content == expected.choices[0].text
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="all-r16", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_logprobs_name_each_chosen_token(assets, client):
    answer = client.chat.completions.create(model="pattern", messages=[{"role": "user", "content": "fox"}], max_tokens=4,
                                            temperature=0, logprobs=True)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(item.logprob <= 0 for item in content)


def test_seeded_sampling_repeats(client):
    runs = [client.completions.create(model="mlp-r2", prompt="fox", max_tokens=N, temperature=1.0, seed=7).choices[0].text
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_models_list_the_base_and_the_callers_adapters(server, client):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == server.engine.settings.public_model_name and sorted(ids[1:]) == sorted(ADAPTERS)
    assert all(m.owned_by == "default" for m in models.data[1:])
    assert client.models.retrieve("qv-r4").parent == ids[0]
    other = openai.OpenAI(base_url=server.base_url, api_key=server.keys["other"], max_retries=0)
    assert [m.id for m in other.models.list().data] == [ids[0]]  # another tenant sees none of them


def test_errors_are_openai_error_objects_with_the_right_status(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="fox", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
    other = openai.OpenAI(base_url=server.base_url, api_key=server.keys["other"], max_retries=0)
    with pytest.raises(openai.NotFoundError):  # another tenant's adapter does not exist for this caller
        other.completions.create(model="qv-r4", prompt="fox", max_tokens=2)
    bad = openai.OpenAI(base_url=server.base_url, api_key="lmx-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.type == "authentication_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv-r4", prompt="fox", max_tokens=2, n=17)  # n at its limit + 1
    assert e.value.code == "invalid_parameter" and e.value.param == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv-r4", prompt="fox", max_tokens=2, temperature=-1)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv-r4", prompt="fox", max_tokens=10**9)
    assert e.value.param == "max_tokens"  # the engine's max_new_tokens, named as the request names it


def test_malformed_and_oversized_bodies_are_refused_cleanly(server):
    url = server.base_url + "/completions"
    headers = {"Authorization": f"Bearer {server.keys['default']}", "Content-Type": "application/json"}
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_request"
    r = httpx.post(url, content=json.dumps({"model": "qv-r4"}), headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    huge = json.dumps({"model": "qv-r4", "prompt": "x" * (server.engine.settings.max_prompt_bytes * 3 + 5_000_000)})
    r = httpx.post(url, content=huge, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    engine = server.engine
    body = {"model": "qv-r4", "prompt": "fox", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {server.keys['default']}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: ")).startswith("data: {")
            eventually(lambda: engine.stats().running == 1)
    eventually(lambda: engine.stats().running == 0)  # closed mid-stream: the row is freed


def test_probes(server):
    base = server.base_url.removesuffix("/v1")
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").status_code == 200


def test_a_request_joins_the_callers_trace_with_the_engine_spans_under_it(assets):
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from loramux.server.telemetry.providers import build_telemetry

    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    settings = assets.settings(http_port=0, batch_window_ms=0)
    telemetry = build_telemetry(settings, span_processors=[SimpleSpanProcessor(exporter)], metric_readers=[reader])
    with BackgroundServer(settings, telemetry=telemetry) as srv:
        srv.engine.load_adapter("default", "qv-r4", "qv-r4")
        trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        url = f"http://127.0.0.1:{srv.running.http_port}/v1/completions"
        for stream in (False, True):
            exporter.clear()
            r = httpx.post(url, json={"model": "qv-r4", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0,
                                      "stream": stream}, headers={"traceparent": f"00-{trace_id}-{parent}-01"})
            assert r.status_code == 200

            def tree():
                spans = exporter.get_finished_spans()
                server = next(s for s in spans if s.name == "POST /v1/completions")
                children = {s.name for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id}
                assert children == {"loramux.queue", "loramux.adapter.resolve", "loramux.prefill", "loramux.decode"}
                return server
            server = eventually(tree)
            assert server.kind is SpanKind.SERVER and format(server.context.trace_id, "032x") == trace_id
            assert format(server.parent.span_id, "016x") == parent
            a = server.attributes
            assert a["http.response.status_code"] == 200 and a["loramux.adapter.id"] == "qv-r4"
            assert a["gen_ai.usage.output_tokens"] == 4 and a["gen_ai.request.max_tokens"] == 4
        points = [p for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                  if m.name == "loramux.http.requests" for p in m.data.data_points]
        assert sum(p.value for p in points if p.attributes["http.route"] == "/v1/completions") == 2
    telemetry.shutdown()


def test_generation_controls_through_both_front_doors(assets, server, client):
    import loramux.client as lc

    first = assets.oracle("qv-r4", PROMPTS[0], N)[0]
    # logit_bias: +100 makes one token the greedy choice at every step
    forced = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                       logit_bias={"17": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == text_of(assets, [17] * 4)
    # min_tokens: a stop token cannot end the row before it
    stopped = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                        extra_body={"stop_token_ids": [first]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                     extra_body={"stop_token_ids": [first], "min_tokens": 3})
    assert held.usage.completion_tokens >= 3
    # top_logprobs: the model's own most likely tokens, the greedy choice first
    chat = client.chat.completions.create(model="pattern", messages=[{"role": "user", "content": "fox"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=3)
    for item in chat.choices[0].logprobs.content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == item.logprob >= item.top_logprobs[1].logprob
    text = client.completions.create(model="pattern", prompt="fox", max_tokens=3, temperature=0, logprobs=2)
    assert len(text.choices[0].logprobs.top_logprobs) == 3 and all(len(d) <= 2 for d in text.choices[0].logprobs.top_logprobs)
    # gRPC: the same controls, the same answers
    with lc.Client(server.target, api_key=server.keys["default"], timeout=60) as grpc_client:
        result = grpc_client.generate(adapter_id="qv-r4", prompt=PROMPTS[0], max_new_tokens=4, logit_bias={17: 100.0},
                                      ignore_eos=True, top_logprobs=2)
        assert result.token_ids == [17] * 4 and len(result.top_logprobs) == 4
        assert all(len(alternatives) == 2 for alternatives in result.top_logprobs)
        assert grpc_client.generate(adapter_id="qv-r4", prompt=PROMPTS[0], max_new_tokens=6, stop_token_ids=[first],
                                    min_tokens=3).usage.completion_tokens >= 3
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv-r4", prompt="fox", max_tokens=2, presence_penalty=3)
    assert e.value.param == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="qv-r4", prompt="fox", max_tokens=2, logit_bias={"999999": 1})
    assert e.value.param == "logit_bias"


def test_tokenize_counts_what_generation_would_feed(assets, server, client):
    import loramux.client as lc

    long_prompt = " ".join(PROMPTS * 40)
    headers = {"Authorization": f"Bearer {server.keys['other']}"}  # a user's role is enough
    r = httpx.post(server.base_url.removesuffix("/v1") + "/tokenize", json={"prompt": long_prompt}, headers=headers)
    expected = assets.tokenizer(long_prompt)["input_ids"]
    assert r.status_code == 200 and r.json()["tokens"] == expected and r.json()["count"] == len(expected)
    assert r.json()["max_model_len"] == server.engine.base.max_sequence_length < len(expected)  # counted, not refused
    messages = [{"role": "user", "content": "the quick brown"}]
    r = httpx.post(server.base_url.removesuffix("/v1") + "/tokenize", json={"messages": messages}, headers=headers)
    chat = client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=1, temperature=0)
    assert r.json()["count"] == chat.usage.prompt_tokens
    with lc.Client(server.target, api_key=server.keys["other"], timeout=60) as grpc_client:
        tokens = grpc_client.tokenize(messages=messages)
        assert tokens.token_ids == r.json()["tokens"] and tokens.max_context == r.json()["max_model_len"]
        with pytest.raises(lc.InvalidArgument) as e:
            grpc_client.tokenize()
        assert e.value.reason == "PROMPT_REQUIRED"


def test_hostile_bodies_are_bounded_and_specific(server, monkeypatch):
    import socket

    from loramux.server.http_api import routes

    url = server.base_url + "/completions"
    headers = {"Authorization": f"Bearer {server.keys['default']}"}
    # a million logit_bias entries: refused by count (the body itself is within the size bound)
    body = {"model": "qv-r4", "prompt": "fox", "max_tokens": 1, "logit_bias": {str(i): 1 for i in range(1_000_000)}}
    r = httpx.post(url, json=body, headers=headers, timeout=60)
    assert r.status_code in (400, 413) and r.json()["error"]["param"] in ("logit_bias", None)
    chat = {"model": "qv-r4", "messages": [{"role": "user", "content": "x"}] * 5000, "max_tokens": 1}
    r = httpx.post(server.base_url + "/chat/completions", json=chat, headers=headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"  # bounded as it is parsed
    r = httpx.post(url, json={"model": "qv-r4", "prompt": "fox", "max_tokens": 1, "best_of": 2}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = httpx.post(url, json={"model": "qv-r4", "prompt": [[1, 2], [3]], "max_tokens": 1}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url, json={"model": "qv-r4", "prompt": [10**12], "max_tokens": 1}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(url, json={"model": "qv-r4", "prompt": "fox", "max_tokens": 1, "logit_bias": {"\u00b2": 1}}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"  # a digit to isdigit(), not to int()
    r = httpx.post(url, json={"model": "qv-r4", "prompt": "fox", "max_tokens": 0}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # a body that trickles in: answered 408 once its time is up, the server serving others meanwhile
    monkeypatch.setattr(routes, "BODY_TIMEOUT_S", 0.5)
    port = server.running.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.keys["default"].encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
        assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200  # others are served
        answer = b""
        while b"request_timeout" not in answer:  # the head and the body may come in separate segments
            more = slow.recv(4096)
            if not more:
                break
            answer += more
    assert answer.decode().startswith("HTTP/1.1 408") and b"request_timeout" in answer


def test_a_client_that_disconnects_before_a_whole_answer_frees_its_row(server, caplog):
    import logging
    import socket

    caplog.set_level(logging.INFO, logger="loramux.access")
    engine = server.engine
    body = json.dumps({"model": "qv-r4", "prompt": "fox", "max_tokens": 4000, "ignore_eos": True}).encode()
    with socket.create_connection(("127.0.0.1", server.running.http_port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.keys["default"].encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                  + body)
        eventually(lambda: engine.stats().running == 1)
    eventually(lambda: engine.stats().running == 0)  # not streamed: freed all the same
    # ... because it was cancelled (answered 499), not because it ran to its end
    eventually(lambda: any(getattr(r, "http_status", None) == 499 for r in caplog.records))


def test_streamed_logprobs_offsets_run_on_across_chunks(client):
    chunks = list(client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=0,
                                            stream=True, extra_body={"top_k": -1}))  # -1: vLLM's "off", accepted
    seen = ""
    for c in chunks:
        if c.choices and c.choices[0].logprobs is not None:
            assert c.choices[0].logprobs.text_offset[0] == len(seen)
        if c.choices:
            seen += c.choices[0].text
    assert seen


def test_n_completions_share_one_prefill_and_each_equals_its_seed_alone(assets, server, client):
    """n=4: one prefill of the prompt, four rows; completion i samples as a request with
    seed + i alone would; greedy ones are the peft oracle's; streamed, each index's text
    equals its whole one; usage counts the prompt once."""
    engine = server.engine
    before = engine.stats().prefills
    many = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=N, temperature=1.0, seed=11, n=4)
    assert engine.stats().prefills - before == 1
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    alone_tokens = 0
    for i, choice in enumerate(many.choices):
        alone = client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=N, temperature=1.0, seed=11 + i)
        assert (choice.text, choice.finish_reason) == (alone.choices[0].text, alone.choices[0].finish_reason), i
        alone_tokens += alone.usage.completion_tokens
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.prompt_tokens == len(assets.tokenizer(PROMPTS[0])["input_ids"])
    assert many.usage.completion_tokens == alone_tokens
    greedy = client.chat.completions.create(model="all-r16", messages=[{"role": "user", "content": PROMPTS[1]}],
                                            max_tokens=N, temperature=0, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1
    chunks = list(client.completions.create(model="qv-r4", prompt=PROMPTS[0], max_tokens=N, temperature=1.0, seed=11, n=4,
                                            stream=True, stream_options={"include_usage": True}))
    for i, choice in enumerate(many.choices):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) == choice.text
    assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens
    # n at its limit, beside another caller's request: 16 rows, and the other's answer is peft's
    with cf.ThreadPoolExecutor(2) as pool:
        wide = pool.submit(client.completions.create, model="qv-r4", prompt="fox", max_tokens=2, temperature=1.0, n=16)
        other = pool.submit(client.completions.create, model="all-r16", prompt=PROMPTS[1], max_tokens=N, temperature=0)
        assert [c.index for c in wide.result().choices] == list(range(16))
        assert other.result().choices[0].text == text_of(assets, assets.oracle("all-r16", PROMPTS[1], N))


def test_echo_and_prompt_logprobs_are_peft_s_scores_of_the_prompt(assets, server, client, monkeypatch):
    """echo with logprobs (lm-evaluation-harness's loglikelihood call): the prompt's tokens
    come first, the first unscored, each other with peft's log-probability of it given the
    tokens before; vLLM's prompt_logprobs gives the same with ranks, through HTTP and gRPC."""
    import torch
    import loramux.client as lc

    ids = assets.tokenizer(PROMPTS[3])["input_ids"]
    with torch.no_grad():
        logits = assets.peft_model("rslora-r8")(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ranks = (torch.log_softmax(logits[:-1], -1) > expected[:, None]).sum(-1) + 1
    answer = client.completions.create(model="rslora-r8", prompt=PROMPTS[3], max_tokens=2, temperature=0, echo=True,
                                       logprobs=2)
    choice = answer.choices[0]
    assert "prompt_logprobs" not in (choice.model_extra or {})  # echo's scores are in logprobs, as OpenAI's
    alone = client.completions.create(model="rslora-r8", prompt=PROMPTS[3], max_tokens=2, temperature=0)
    assert choice.text == PROMPTS[3] + alone.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:len(ids)]), expected, atol=1e-4)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])  # keyed by text: two byte tokens may both be "\ufffd"
    assert lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset[len(ids)] == len(PROMPTS[3])  # BOS takes no text
    chat = client.chat.completions.create(model="rslora-r8", messages=[{"role": "user", "content": "fox"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 1})
    assert chat.choices[0].model_extra["prompt_logprobs"][0] is None
    scored = client.completions.create(model="rslora-r8", prompt=PROMPTS[3], max_tokens=1, extra_body={"prompt_logprobs": 0})
    prompt_lps = scored.choices[0].model_extra["prompt_logprobs"]
    assert prompt_lps[0] is None and len(prompt_lps) == len(ids)
    for i, entry in enumerate(prompt_lps[1:]):
        mine = entry[str(ids[i + 1])]
        assert abs(mine["logprob"] - expected[i].item()) < 1e-4 and mine["rank"] == ranks[i].item()
    streamed = list(client.completions.create(model="rslora-r8", prompt=PROMPTS[3], max_tokens=2, temperature=0, echo=True,
                                              logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    with lc.Client(server.target, api_key=server.keys["default"], timeout=60) as grpc_client:
        result = grpc_client.generate(adapter_id="rslora-r8", prompt=PROMPTS[3], max_new_tokens=1, prompt_logprobs=3, n=2,
                                      temperature=1.0, seed=1)
    with pytest.raises(openai.BadRequestError) as e:
        monkeypatch.setattr("loramux.server.engine.engine.PROMPT_LOGPROBS_BYTES", 4 * 400 * 3)
        client.completions.create(model="rslora-r8", prompt=PROMPTS[3], max_tokens=1, echo=True, logprobs=0)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt_logprobs"
    assert result.prompt.token_ids == ids and result.prompt.ranks == ranks.tolist()
    assert torch.allclose(torch.tensor(result.prompt.logprobs), expected, atol=1e-4)
    assert [len(a) for a in result.prompt.top_logprobs] == [3] * (len(ids) - 1) and len(result.completions) == 2


def test_probed_fields_get_their_own_answer_and_harm_no_other_request(assets, server, client):
    """What a probe of this door found: each is answered for its own request alone."""
    url = server.base_url + "/completions"
    headers = {"Authorization": f"Bearer {server.keys['default']}"}
    # A top_k beyond 64 bits once failed the whole prefill it shared with other tenants' requests:
    # now any top_k of the vocabulary's size or more keeps every token (as off does).
    bystander = {"model": "qv-r4", "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0}
    with cf.ThreadPoolExecutor(4) as pool:
        huge = [pool.submit(httpx.post, url, json={**bystander, "top_k": k}, headers=headers, timeout=60)
                for k in (2**63, 10**30)]
        plain = pool.submit(httpx.post, url, json=bystander, headers=headers, timeout=60)
        answers = [f.result() for f in [*huge, plain]]
    want = text_of(assets, assets.oracle("qv-r4", PROMPTS[0], N))
    assert [(r.status_code, r.json()["choices"][0]["text"]) for r in answers] == [(200, want)] * 3
    for key in ("--5", "-", "5-", "+5"):  # one sign at most, and only a minus
        r = httpx.post(url, json={**bystander, "logit_bias": {key: 1}}, headers=headers)
        assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["param"]) == (400, "invalid_parameter",
                                                                                      "logit_bias"), key
    r = httpx.post(url, json={**bystander, "logit_bias": {"-5": 1}}, headers=headers)  # a token id out of range
    assert (r.status_code, r.json()["error"]["param"]) == (400, "logit_bias")
    # The router's own refusals are error objects too.
    r = httpx.get(url, headers=headers)
    assert (r.status_code, r.json()["error"]["code"], r.headers["allow"]) == (405, "method_not_allowed", "POST")
    r = httpx.post(server.base_url + "/nowhere", json={}, headers=headers)
    assert (r.status_code, r.json()["error"]["code"], r.json()["error"]["type"]) == (404, "not_found",
                                                                                    "invalid_request_error")
    # Validation names the field as the engine does, without the union member pydantic tried.
    chat = server.base_url + "/chat/completions"
    r = httpx.post(chat, json={"model": "qv-r4", "messages": [{"role": "user", "content": 5}]}, headers=headers)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages[0].content")
    r = httpx.post(chat, json={"model": "qv-r4", "messages": [{"role": "user", "content": "x"}], "tool_choice": 5},
                   headers=headers)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "tool_choice")


def test_a_large_body_is_converted_off_the_event_loop(server, client, monkeypatch):
    """Parsing and converting a body over 64 KiB (its tools' schemas written out, its messages)
    run on a worker thread; a small body is converted on the loop."""
    import asyncio

    from loramux.server.http_api import schemas

    on_loop = []
    convert = schemas.ChatCompletionRequest.to_input

    def recording(self, *args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return convert(self, *args)

    monkeypatch.setattr(schemas.ChatCompletionRequest, "to_input", recording)
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 100_000, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"]}}}
    messages = [{"role": "user", "content": "fox"}]
    for tools in ([], [tool]):
        client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=2, temperature=0,
                                       tools=tools or openai.NOT_GIVEN)
    assert on_loop == [True, False]


def test_an_adapter_may_not_take_the_served_models_name(server, client):
    from loramux.server.errors import InvalidRequest

    public = client.models.list().data[0].id
    with pytest.raises(InvalidRequest) as caught:
        server.engine.load_adapter("default", public, "qv-r4")
    assert (caught.value.reason, caught.value.field) == ("ADAPTER_ID_RESERVED", "adapter_id")
    assert public not in [a.adapter_id for a in server.engine.list_adapters("default")]
