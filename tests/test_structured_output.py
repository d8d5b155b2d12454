"""Structured output: each row's answer held to its own JSON schema, regex, grammar or choices,
in mixed batches with different adapters, equal token for token to peft's greedy decoding
under the same llguidance mask; through gRPC, the SDK and the OpenAI client; hostile
constraints refused or bounded, one request's constraint harming no other."""

import concurrent.futures as cf
import json
import time

import grpc
import jsonschema
import llguidance
import llguidance.hf
import openai
import pytest
import torch

from conftest import ADAPTERS, PROMPTS, eventually
from loramux.client import Client
from loramux.client.errors import LoramuxError as ClientError
from loramux.server.app import BackgroundServer
from loramux.server.engine.constraints import MAX_SPEC_BYTES, Constraint
from loramux.server.engine.structured import COMPILE_STACK_BYTES
from loramux.server.engine.inputs import GenerateInput

N = 24
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}  # as docs/api.md says
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                                                              "maxItems": 3}},
         "required": ["ok", "tags"], "additionalProperties": False}
CONSTRAINTS = {
    "person": Constraint("json_schema", json.dumps(PERSON)),
    "flags": Constraint("json_schema", json.dumps(FLAGS)),
    "object": Constraint("json_object"),
    "date": Constraint("regex", r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"),
    "sum": Constraint("grammar", 'start: NUM ("+" NUM)*\nNUM: /[1-9][0-9]{0,2}/'),
    "yesno": Constraint("choice", json.dumps(["yes", "no", "not sure"])),
}


def oracle_grammar(c: Constraint) -> str:
    M = llguidance.LLMatcher
    if c.kind == "json_schema":
        return M.grammar_from_json_schema(c.spec, defaults=COMPACT)
    if c.kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=COMPACT)
    if c.kind == "regex":
        return M.grammar_from_regex(c.spec)
    if c.kind == "grammar":
        return M.grammar_from_lark(c.spec)
    return M.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in json.loads(c.spec)))


@pytest.fixture(scope="module")
def ll_tokenizer(assets):
    return llguidance.hf.from_tokenizer(assets.tokenizer, n_vocab=len(assets.tokenizer))


def constrained_oracle(assets, ll_tokenizer, adapter, prompt, c: Constraint, n: int) -> list[int]:
    """peft's model, greedy, one token at a time, with llguidance's mask: written here
    independently of loramux's engine."""
    model = assets.peft_model(adapter)
    matcher = llguidance.LLMatcher(ll_tokenizer, oracle_grammar(c), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = assets.tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    eos = assets.tokenizer.eos_token_id
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids).logits[0, -1].float()
            bits = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.uint8)
            allowed = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: logits.shape[0]].bool()
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(token)
            if token == eos:
                break
            assert matcher.consume_token(token)
            if matcher.is_stopped():
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.fixture(scope="module")
def server(assets):
    with BackgroundServer(assets.settings(http_port=0, adapter_slots=5, max_batch_size=16, batch_window_ms=50)) as srv:
        for name in ADAPTERS:
            srv.engine.load_adapter("default", name, name)
        yield srv


def test_every_kind_in_one_mixed_batch_equals_peft_under_the_same_mask(assets, server, ll_tokenizer):
    adapters = [None, *ADAPTERS]
    jobs = [(adapters[i % len(adapters)], PROMPTS[i % len(PROMPTS)], name) for i, name in enumerate(CONSTRAINTS)]
    jobs += [(a, PROMPTS[1], "person") for a in adapters]  # one schema, every adapter
    jobs.append((None, PROMPTS[0], None))  # and a free row
    engine = server.engine

    def run(job):
        adapter, prompt, name = job
        inp = GenerateInput(adapter_id=adapter or "", prompt=prompt, max_new_tokens=N,
                            constraint=CONSTRAINTS[name] if name else None)
        return engine.generate("default", inp, 120)

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))
    for (adapter, prompt, name), result in zip(jobs, results):
        if name is None:
            assert result["token_ids"] == assets.oracle(adapter, prompt, N)
            continue
        expected = constrained_oracle(assets, ll_tokenizer, adapter, prompt, CONSTRAINTS[name], N)
        assert result["token_ids"] == expected, (adapter, name)
        complete = len(expected) < N or expected[-1] == assets.tokenizer.eos_token_id
        assert result["finish"].finish_reason.value == ("stop_token" if complete else "length"), (adapter, name)
        text = result["text"]
        if complete and name in ("person", "flags"):
            jsonschema.validate(json.loads(text), PERSON if name == "person" else FLAGS)
        if complete and name == "yesno":
            assert text in ("yes", "no", "not sure")
    # The masks changed something: unconstrained, the model does not write these answers.
    assert any(r["token_ids"] != assets.oracle(a, p, N) for (a, p, n), r in zip(jobs, results) if n)


def test_the_openai_client_gets_schema_valid_json_for_every_adapter_in_a_mixed_batch(assets, server):
    base = server.engine.settings.public_model_name
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    schemas = [PERSON, FLAGS]
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        jobs = [(model, schemas[i % 2]) for i, model in enumerate([base, *ADAPTERS] * 2)]

        def ask(job):
            model, schema = job
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "the quick brown"}], max_tokens=64, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        with cf.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        for (model, schema), answer in zip(jobs, answers):
            choice = answer.choices[0]
            assert choice.finish_reason == "stop", (model, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), schema)
        # Streamed, the same answer; vLLM's guided_* extensions too.
        streamed = client.chat.completions.create(
            model="qv-r4", messages=[{"role": "user", "content": "the quick brown"}], max_tokens=64, temperature=0,
            stream=True, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": PERSON}})
        whole = ask(("qv-r4", PERSON)).choices[0].message.content
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole
        choice = client.completions.create(model=base, prompt="fox", max_tokens=8, temperature=0,
                                           extra_body={"guided_choice": ["red fox", "blue fox"]})
        assert choice.choices[0].text in ("red fox", "blue fox") and choice.choices[0].finish_reason == "stop"
        newer = client.completions.create(model=base, prompt="fox", max_tokens=8, temperature=0,
                                          extra_body={"structured_outputs": {"choice": ["red fox", "blue fox"]}})
        assert newer.choices[0].text == choice.choices[0].text  # vLLM's newer name, the same constraint
        date = client.completions.create(model="all-r16", prompt="fox", max_tokens=16, temperature=0.8, seed=3,
                                         extra_body={"guided_regex": "[0-9]{4}-[0-9]{2}"})
        assert len(date.choices[0].text) == 7 and date.choices[0].text[4] == "-"


def test_the_sdk_sends_each_kind(server):
    with Client(server.target, timeout=60) as client:
        person = client.generate(prompt="fox", json_schema=PERSON, max_new_tokens=64)
        jsonschema.validate(json.loads(person.text), PERSON)
        assert client.generate(prompt="fox", choice=["alpha", "beta"], max_new_tokens=8).text in ("alpha", "beta")
        assert json.loads(client.generate(prompt="fox", json_object=True, max_new_tokens=64).text) is not None
        with pytest.raises(ValueError, match="at most one"):
            client.generate(prompt="fox", regex="a", choice=["b"])


@pytest.mark.parametrize("constraint, reason", [
    (Constraint("json_schema", '{"type": "objectx"}'), "INVALID_GRAMMAR"),
    (Constraint("json_schema", "{not json"), "INVALID_GRAMMAR"),
    (Constraint("json_schema", "[1, 2]"), "INVALID_GRAMMAR"),
    (Constraint("regex", "(unclosed"), "INVALID_GRAMMAR"),
    (Constraint("grammar", "start: undefined_rule"), "INVALID_GRAMMAR"),
    (Constraint("choice", "[]"), "INVALID_GRAMMAR"),
    (Constraint("choice", '["a", 3]'), "INVALID_GRAMMAR"),
    (Constraint("regex", "a" * (MAX_SPEC_BYTES + 1)), "GRAMMAR_TOO_LARGE"),
    (Constraint("grammar", "start: " + "(" * 5000 + '"a"' + ")" * 5000), "INVALID_GRAMMAR"),
    (Constraint("json_schema", "[" * 100_000 + "]" * 100_000), "GRAMMAR_TOO_LARGE"),
    # Numbers the library would read as the most negative 64-bit integer crash its process
    # (llguidance 1.9.1, a segfault); beyond 64 bits it saturates bounds silently: refused first.
    (Constraint("json_schema", '{"type": "integer", "minimum": -1e40, "maximum": -1e39}'), "INVALID_GRAMMAR"),
    (Constraint("json_schema", '{"type": "object", "properties": {"a": {"const": -9223372036854775807}}}'), "INVALID_GRAMMAR"),
    (Constraint("json_schema", '{"enum": [[1, -9223372036854775807]]}'), "INVALID_GRAMMAR"),
    (Constraint("json_schema", '{"type": "integer", "minimum": 1e40, "maximum": 1e41}'), "INVALID_GRAMMAR"),
    (Constraint("grammar", 'start: "n=" %json {"type": "integer", "minimum": -1e40, "maximum": -1e39}'), "INVALID_GRAMMAR"),
])
def test_a_bad_constraint_is_refused_before_anything_is_queued(server, constraint, reason):
    from loramux.server.errors import InvalidRequest

    before = server.engine.stats().steps
    with pytest.raises(InvalidRequest) as caught:
        server.engine.generate("default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=constraint), 60)
    assert caught.value.reason == reason and caught.value.field == "structured_output", caught.value.message
    assert server.engine.stats().steps == before


def test_grpc_and_http_name_the_refusal(server):
    with Client(server.target, timeout=60) as client:
        with pytest.raises(ClientError) as caught:
            client.generate(prompt="fox", json_schema='{"type": "objectx"}')
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and caught.value.reason == "INVALID_GRAMMAR"
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="qv-r4", prompt="fox", extra_body={"guided_regex": "(unclosed"})
        assert bad.value.body["code"] == "invalid_grammar" and bad.value.body["param"] == "guided_regex"  # as it was named
        with pytest.raises(openai.BadRequestError) as schema:
            client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "fox"}],
                                           response_format={"type": "json_schema",
                                                            "json_schema": {"name": "x", "schema": {"type": "objectx"}}})
        assert schema.value.body["param"] == "response_format"
        with pytest.raises(openai.BadRequestError) as newer:
            client.completions.create(model="qv-r4", prompt="fox", extra_body={"structured_outputs": {"regex": "(x"}})
        assert newer.value.body["param"] == "structured_outputs"
        with pytest.raises(openai.BadRequestError) as again:  # the same constraint's cached refusal, named anew
            client.completions.create(model="qv-r4", prompt="fox", extra_body={"guided_regex": "(x"})
        assert again.value.body["param"] == "guided_regex"
        with pytest.raises(openai.BadRequestError) as both:
            client.completions.create(model="qv-r4", prompt="fox",
                                      extra_body={"response_format": {"type": "json_object"}, "guided_regex": "a"})
        assert both.value.body["code"] == "invalid_parameter" and "at most one" in both.value.body["message"]
        with pytest.raises(openai.BadRequestError) as kind:
            client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "fox"}],
                                           response_format={"type": "xml"})
        assert kind.value.body["param"] == "response_format"


def test_hostile_constraints_are_bounded_and_harm_no_other_request(assets, server):
    """Each within the size limit, each compiled off the engine thread while a free request
    decodes: a recursive $ref, a 12,000-value enum, a grammar of 4,000 chained rules (deep
    recursion: the compile threads' large stacks), regexes whose automata explode."""
    chain = "start: r0\n" + "".join(f'r{i}: "x{i}" | r{i + 1}\n' for i in range(4000)) + 'r4000: "end"\n'
    enum = {"enum": [f"v{i}" for i in range(12_000)]}
    assert len(chain) < MAX_SPEC_BYTES and len(json.dumps(enum)) < MAX_SPEC_BYTES
    hostile = [
        Constraint("json_schema", json.dumps({"$defs": {"n": {"type": "object", "properties": {
            "c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}, "required": ["c"]}}, "$ref": "#/$defs/n"})),
        Constraint("json_schema", json.dumps(enum)),
        Constraint("grammar", chain),
        Constraint("regex", "(a|aa){0,1000}b"),
        Constraint("regex", ".{0,3000}x.{0,3000}"),
    ]
    engine = server.engine
    free = GenerateInput(prompt=PROMPTS[0], max_new_tokens=N)
    with cf.ThreadPoolExecutor(len(hostile) + 1) as pool:
        bystander = pool.submit(engine.generate, "default", free, 120)
        started = time.monotonic()
        outcomes = []
        for c in hostile:
            outcomes.append(pool.submit(engine.generate, "default", GenerateInput(prompt="fox", max_new_tokens=16,
                                                                                  constraint=c), 120))
        for future in outcomes:
            try:
                result = future.result()
                assert result["finish"].finish_reason.value in ("stop_token", "length")
            except Exception as e:  # noqa: BLE001 - a refusal must be the request's own, named
                assert getattr(e, "reason", "") in ("GRAMMAR_FAILED", "GRAMMAR_TOO_COMPLEX", "INVALID_GRAMMAR"), e
        assert bystander.result()["token_ids"] == assets.oracle(None, PROMPTS[0], N)
    assert time.monotonic() - started < 60


def test_compiled_constraints_are_cached_and_the_compile_queue_is_bounded(server):
    grammars = server.engine.grammars()
    c = Constraint("regex", "[a-f]{3}-cached")
    server.engine.generate("default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=c), 60)
    future = grammars._cache[c]
    server.engine.generate("default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=c), 60)
    assert grammars._cache[c] is future  # compiled once
    # A compiler whose one thread is busy and whose queue is full refuses more, retryably.
    import threading

    from loramux.server.engine.structured import _Compiler
    from loramux.server.errors import QueueFull

    gate = threading.Event()
    compiler = _Compiler(threads=1, stack_bytes=COMPILE_STACK_BYTES, capacity=2)
    running = compiler.submit(gate.wait)
    eventually(lambda: running.running())  # taken by the thread: the queue is empty again
    waiting = [compiler.submit(lambda: "later") for _ in range(2)]
    with pytest.raises(QueueFull) as e:
        compiler.submit(lambda: "too many")
    assert e.value.reason == "GRAMMAR_QUEUE_FULL" and e.value.retry_after_s == 1.0
    gate.set()
    assert [w.result(10) for w in waiting] == ["later", "later"]


WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"], "additionalProperties": False}}}


def test_a_forced_tool_call_comes_back_as_tool_calls_whole_and_streamed(server):
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    messages = [{"role": "user", "content": "the quick brown"}]
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        named = client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=64, temperature=0,
                                               tools=[WEATHER, TIME], tool_choice={"type": "function",
                                                                                   "function": {"name": "time"}})
        choice = named.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "time" and call.id.startswith("call_")
        assert json.loads(call.function.arguments)["zone"] in ("utc", "cet")
        required = client.chat.completions.create(model="all-r16", messages=messages, max_tokens=200, temperature=0,
                                                  tools=[WEATHER, TIME], tool_choice="required")
        calls = required.choices[0].message.tool_calls
        assert required.choices[0].finish_reason == "tool_calls" and calls
        for c in calls:
            jsonschema.validate(json.loads(c.function.arguments), (WEATHER if c.function.name == "weather" else TIME)
                                ["function"]["parameters"])
        chunks = list(client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=64, temperature=0,
                                                     tools=[WEATHER, TIME], stream=True,
                                                     tool_choice={"type": "function", "function": {"name": "time"}}))
        deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
        assert len(deltas) == 1 and deltas[0][0].function.arguments == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        for bad, why in ([{"type": "function", "function": {"name": "nope"}}, "not in tools"], ["required", "tools is empty"]):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model="qv-r4", messages=messages, tool_choice=bad,
                                               tools=[WEATHER] if why != "tools is empty" else openai.NOT_GIVEN)
            assert why in caught.value.body["message"] and caught.value.body["param"] == "tool_choice"


def test_a_forced_tool_call_cut_short_is_text_with_finish_reason_length(server):
    """An answer that parses as JSON is not a complete call when max_tokens cut it: nine digits
    at least, in at most two tokens of this vocabulary."""
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    count = {"type": "function", "function": {"name": "count", "parameters": {"type": "integer", "minimum": 100_000_000}}}
    ask = dict(model="qv-r4", messages=[{"role": "user", "content": "lazy dog number 21"}], max_tokens=2,
               temperature=0, tools=[count], tool_choice={"type": "function", "function": {"name": "count"}})
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        whole = client.chat.completions.create(**ask)
        chunks = list(client.chat.completions.create(**ask, stream=True))
    choice = whole.choices[0]
    assert (choice.finish_reason, choice.message.tool_calls) == ("length", None)
    assert json.loads(choice.message.content) < 100_000_000  # a prefix that parses, and is no answer
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content


def test_n_through_grpc_and_the_sdk_shares_one_prefill(assets, server):
    """gRPC n=3: one prefill; completion i equals a request with seed + i alone; streamed
    chunks carry their completion's index; n out of range is refused before anything runs;
    n with structured output gives each completion its own matcher."""
    engine = server.engine
    with Client(server.target, timeout=60) as client:
        before = engine.stats().prefills
        many = client.generate(adapter_id="pattern", prompt=PROMPTS[2], max_new_tokens=N, temperature=0.9, seed=7, n=3)
        assert engine.stats().prefills - before == 1
        assert [c.index for c in many.completions] == [0, 1, 2] and many.text == many.completions[0].text
        for i, completion in enumerate(many.completions):
            alone = client.generate(adapter_id="pattern", prompt=PROMPTS[2], max_new_tokens=N, temperature=0.9, seed=7 + i)
            assert (completion.token_ids, completion.finish_reason) == (alone.token_ids, alone.finish_reason), i
        assert many.usage.completion_tokens == sum(len(c.token_ids) for c in many.completions)
        chunks = list(client.generate_stream(adapter_id="pattern", prompt=PROMPTS[2], max_new_tokens=N, temperature=0.9,
                                             seed=7, n=3))
        for completion in many.completions:
            ids = [t for c in chunks if c.index == completion.index for t in c.token_ids]
            assert ids == completion.token_ids
        assert sum(1 for c in chunks if c.finish_reason) == 3
        for bad in (17, -1, 2**31 - 1):
            before = engine.stats().prefills
            with pytest.raises(ClientError) as caught:
                client.generate(prompt="fox", n=bad)
            assert caught.value.reason == "INVALID_SAMPLING_PARAMETER" and engine.stats().prefills == before
        shaped = client.generate(prompt="fox", choice=["red", "green", "blue"], temperature=1.0, seed=1, n=4,
                                 max_new_tokens=8)
        assert all(c.text in ("red", "green", "blue") and c.finish_reason == "stop_token" for c in shaped.completions)


def test_a_required_tool_call_resolves_each_tools_own_definitions(server):
    """Tools whose parameters reference their own $defs (as pydantic writes schemas): the
    required call's combined schema keeps them resolvable; two tools defining one name
    differently are refused by name."""
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    city = {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"],
        "additionalProperties": False,
        "$defs": {"Place": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
                            "additionalProperties": False}}}}}
    clash = {"type": "function", "function": {"name": "other", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/Place"}}, "$defs": {"Place": {"type": "string"}}}}}
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        answer = client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "fox"}],
                                                max_tokens=200, temperature=0, tools=[city], tool_choice="required")
        assert answer.choices[0].finish_reason == "tool_calls", answer.choices[0].message.content
        for call in answer.choices[0].message.tool_calls:
            assert json.loads(call.function.arguments)["place"]["city"] in ("Paris", "Oslo")
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="qv-r4", messages=[{"role": "user", "content": "fox"}], max_tokens=4,
                                           tools=[city, clash], tool_choice="required")
        assert "$defs/Place differently" in e.value.body["message"]


def test_a_row_whose_masks_are_too_slow_ends_alone(assets, server, monkeypatch):
    """Every row of a batch waits for its constrained rows' masks: a row whose masks stay over
    the per-token budget for three steps ends (GRAMMAR_FAILED, saying why) while a plain
    request in the same batch gets peft's tokens. (The budget is set to nothing here: the tiny
    vocabulary makes every mask fast.)"""
    import loramux.server.engine.structured as structured
    from loramux.server.errors import LoramuxError

    monkeypatch.setattr(structured, "MASK_STEP_BUDGET_S", 0.0)
    engine = server.engine
    with cf.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(engine.generate, "default", GenerateInput(prompt="fox", max_new_tokens=16, ignore_eos=True,
                                                                     constraint=Constraint("regex", "[a-z ]{1,200}")), 60)
        plain = pool.submit(engine.generate, "default", GenerateInput(prompt=PROMPTS[1], max_new_tokens=N), 60)
        assert plain.result()["token_ids"] == assets.oracle(None, PROMPTS[1], N)
        with pytest.raises(LoramuxError) as e:
            slow.result()
    assert e.value.reason == "GRAMMAR_FAILED" and "ms per token" in e.value.message
    assert e.value.metadata["generated"] == "2"  # its third mask was the third over budget


def test_the_attackers_tool_and_schema_shapes_are_answered_by_name(server):
    """Malformed tool_choice and $defs are 400s (not 500s); `#` references inside a tool's
    parameters still mean that tool's schema under tool_choice required; a schema of `true`
    is any JSON."""
    url = f"http://127.0.0.1:{server.running.http_port}/v1"
    messages = [{"role": "user", "content": "fox"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"k": {"anyOf": [{"enum": [0, 1]}, {"$ref": "#/properties/k"}]}},
        "required": ["k"], "additionalProperties": False}}}
    with openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120) as client:
        for choice in ({"type": "function", "function": "f"}, {"type": "function", "function": ["f"]},
                       {"type": "function", "function": None}):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="qv-r4", messages=messages, tools=[tool], tool_choice=choice)
            assert e.value.body["param"] == "tool_choice"
        for defs in (["x"], "abc", 5):
            bad = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "$defs": defs}}}
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="qv-r4", messages=messages, tools=[bad], tool_choice="required")
            assert e.value.body["param"] == "tools"
        answer = client.chat.completions.create(model="qv-r4", messages=messages, tools=[tool], tool_choice="required",
                                                max_tokens=200, temperature=0)
        for call in answer.choices[0].message.tool_calls or []:
            assert json.loads(call.function.arguments)["k"] in (0, 1)
        anything = client.completions.create(model="qv-r4", prompt="fox", max_tokens=24, temperature=0,
                                             extra_body={"guided_json": True})
        assert anything.choices[0].finish_reason in ("stop", "length")


def test_a_prefill_that_fails_ends_only_its_own_requests(assets, server, monkeypatch):
    """A request whose own prefill fails (its prompt's scores, say) fails alone: a plain
    request admitted in the same pass gets peft's tokens."""
    from loramux.server.engine.batch import Batch
    from loramux.server.errors import LoramuxError

    real = Batch.prefill.__func__

    def failing(cls, base, rows, prompt_logprobs=False):
        if prompt_logprobs:
            raise RuntimeError("out of memory for the prompt's scores")
        return real(cls, base, rows, prompt_logprobs)
    monkeypatch.setattr(Batch, "prefill", classmethod(failing))
    engine = server.engine
    with cf.ThreadPoolExecutor(2) as pool:
        scored = pool.submit(engine.generate, "default", GenerateInput(prompt=PROMPTS[0], max_new_tokens=4, prompt_logprobs=0), 60)
        plain = pool.submit(engine.generate, "default", GenerateInput(prompt=PROMPTS[1], max_new_tokens=N), 60)
        assert plain.result()["token_ids"] == assets.oracle(None, PROMPTS[1], N)
        with pytest.raises(LoramuxError) as e:
            scored.result()
    assert e.value.reason == "INTERNAL"


def test_a_request_whose_values_break_a_shared_prefill_fails_alone(assets, server, monkeypatch, caplog):
    """Four requests admitted in one pass: one whose row cannot be made, one whose values break
    the prefill they share (a stand-in for a value no check caught). The prefill is tried whole,
    then per request: the other two get peft's tokens."""
    import threading

    from loramux.server.engine import worker
    from loramux.server.engine.batch import Batch
    from loramux.server.engine.inputs import prompt_ids
    from loramux.server.errors import LoramuxError

    real_prefill, real_row = Batch.prefill.__func__, worker.new_row
    sizes = []

    def prefill(cls, base, rows, prompt_logprobs=False):
        sizes.append(len(rows))
        if any(row.request.prompt_ids == poisoned for row in rows):
            raise ValueError("Overflow when unpacking long")
        return real_prefill(cls, base, rows, prompt_logprobs)

    def new_row(base, request, now):
        if request.prompt_ids == unmade:
            raise OverflowError("a seed out of range")
        return real_row(base, request, now)

    engine = server.engine
    poisoned, unmade = (prompt_ids(GenerateInput(prompt=p), engine.base, engine.settings) for p in PROMPTS[2:4])
    monkeypatch.setattr(Batch, "prefill", classmethod(prefill))
    monkeypatch.setattr(worker, "new_row", new_row)
    gate = threading.Event()
    paused = engine.call_on_engine(gate.wait)  # the engine waits between passes: all four are admitted together
    jobs = [("qv-r4", PROMPTS[0]), ("", PROMPTS[1]), ("", PROMPTS[2]), ("mlp-r2", PROMPTS[3])]
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=N), 60)
                   for a, p in jobs]
        eventually(lambda: engine.stats().waiting == 4)
        gate.set()
        paused.result(10)
        assert [futures[i].result()["token_ids"] for i in (0, 1)] == [assets.oracle("qv-r4", PROMPTS[0], N),
                                                                      assets.oracle(None, PROMPTS[1], N)]
        for i in (2, 3):
            with pytest.raises(LoramuxError) as e:
                futures[i].result()
            assert e.value.reason == "INTERNAL"
    assert sizes == [3, 1, 1, 1]  # the three made rows together, then each alone
    logged = [r.getMessage().split(" (correlation")[0] for r in caplog.records if "correlation id" in r.getMessage()]
    assert sorted(logged) == ["prefilling 3 request(s) failed", "prefilling the request failed",
                              "starting the request failed"]


def test_constraints_that_hang_or_kill_the_library_are_refused_in_a_child_process(assets, server, monkeypatch):
    """Constraints a fuzzing of llguidance found to compile, or take a first mask, for minutes
    or for ever are refused once their check in a child process outlasts CHECK_S; a child that
    dies mid-check refuses its constraint; the engine's process serves on, its compile threads
    free, a free request beside them equal to peft."""
    import threading

    from loramux.server.engine import grammar_check
    from loramux.server.errors import InvalidRequest

    monkeypatch.setattr(grammar_check, "CHECK_S", 1.0)
    engine = server.engine
    check = engine.grammars().check
    hostile = [
        Constraint("json_schema", '{"type": "integer", "multipleOf": 2147483648}'),  # compile: for ever
        Constraint("json_schema", json.dumps({"allOf": [{"type": "string", "pattern": f"a{i}"} for i in range(25)]})),
        Constraint("grammar", 'start: T0 start\nT0: "q"{5000}'),  # first mask: about 1 s (10 s at the library's limits)
        Constraint("grammar", 'start: ("a" | "b") x\nx: T0 x\nT0: "q"{3000}'),  # fast first mask, then a slow second
        Constraint("grammar", 'start: "a" | "z" x\nx: T0 x\nT0: "q"{3000}'),  # slow only past the highest first token
    ]
    with cf.ThreadPoolExecutor(len(hostile) + 1) as pool:
        bystander = pool.submit(engine.generate, "default", GenerateInput(prompt=PROMPTS[0], max_new_tokens=N), 120)
        outcomes = [pool.submit(engine.generate, "default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=c), 60)
                    for c in hostile]
        for future in outcomes:
            with pytest.raises(InvalidRequest) as e:
                future.result()
            assert e.value.reason == "GRAMMAR_TOO_COMPLEX", e.value.message  # outlasted 1 s, or one mask 0.25 s
        assert bystander.result()["token_ids"] == assets.oracle(None, PROMPTS[0], N)
    starts = check.starts
    with pytest.raises(InvalidRequest):  # refused again from the cache: no new check
        engine.generate("default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=hostile[0]), 60)
    assert check.starts == starts

    # A child that dies while it checks (as a crash of the library would end it).
    monkeypatch.setattr(grammar_check, "CHECK_S", 60.0)
    dying = Constraint("json_schema", '{"type": "integer", "multipleOf": 1073741824}')
    with cf.ThreadPoolExecutor(1) as pool:
        future = pool.submit(engine.generate, "default", GenerateInput(prompt="fox", max_new_tokens=4, constraint=dying), 60)
        def checking():
            busy = [c for c in check._all if c.checking is dying]
            assert busy
            return busy[0]

        eventually(checking)
        checking()._process.kill()
        with pytest.raises(InvalidRequest) as e:
            future.result()
    assert e.value.reason == "INVALID_GRAMMAR" and "its process ended" in e.value.message, e.value.message
    started = time.monotonic()
    result = engine.generate("default", GenerateInput(prompt="fox", max_new_tokens=4,
                                                      constraint=Constraint("regex", "[a-c]{2}-after")), 60)
    assert result["finish"].finish_reason.value in ("stop_token", "length") and time.monotonic() - started < 10
    assert threading.active_count() < 200


def test_a_row_whose_mask_outlasts_the_step_wait_ends_and_the_batch_goes_on(assets, server, ll_tokenizer, monkeypatch):
    """A mask call that runs long (a forced loop with no end: about 1 s in its first mask, let
    through the child's check here) is waited for MASK_WAIT_S at most: its row ends, the rows
    beside it, constrained or free, get peft's tokens under their own masks."""
    import threading

    from loramux.server.engine import grammar_check, structured
    from loramux.server.errors import LoramuxError

    monkeypatch.setattr(grammar_check, "CHECK_S", 30.0)
    monkeypatch.setattr(grammar_check, "CHECK_MASK_S", 30.0)
    monkeypatch.setattr(structured, "MASK_WAIT_S", 0.3)
    engine = server.engine
    slow = Constraint("grammar", 'start: T0 start\nT0: "q"{4800}')  # (not the one another test refuses)
    # Two slow rows first: both mask threads are lost in them, and new ones take the other rows.
    jobs = [("slow", None, PROMPTS[0], slow), ("slow2", "qv-r4", PROMPTS[0], slow),
            ("person", "qv-r4", PROMPTS[1], CONSTRAINTS["person"]),
            ("date", None, PROMPTS[2], CONSTRAINTS["date"]), ("free", "mlp-r2", PROMPTS[3], None)]
    engine.grammars().matcher(slow, 60)  # compiled (and checked) before the batch
    gate = threading.Event()
    paused = engine.call_on_engine(gate.wait)
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(engine.generate, "default", GenerateInput(adapter_id=a or "", prompt=p,
                                                                                max_new_tokens=N, constraint=c), 120)
                   for name, a, p, c in jobs}
        eventually(lambda: engine.stats().waiting == len(jobs))
        gate.set()
        paused.result(10)
        for name in ("slow", "slow2"):
            with pytest.raises(LoramuxError) as e:
                futures[name].result()
            assert e.value.reason == "GRAMMAR_FAILED" and "more than 0.3 s" in e.value.message, e.value.message
        for name, adapter, prompt, c in jobs[2:]:
            want = (constrained_oracle(assets, ll_tokenizer, adapter, prompt, c, N) if c is not None
                    else assets.oracle(adapter, prompt, N))
            assert futures[name].result()["token_ids"] == want, name


def test_one_tenants_new_constraints_compile_one_at_a_time(server, monkeypatch):
    """A tenant's two hanging constraints hold one compile thread between them: another
    tenant's new constraint compiles on the other at once, not after them."""
    from loramux.server.engine import grammar_check
    from loramux.server.errors import InvalidRequest

    monkeypatch.setattr(grammar_check, "CHECK_S", 2.0)
    grammars = server.engine.grammars()
    with cf.ThreadPoolExecutor(3) as pool:
        hangs = [pool.submit(grammars.matcher, Constraint("json_schema", json.dumps({"type": "integer", "multipleOf": m})),
                             30, "greedy") for m in (16777216, 123456789)]  # (not cached by another test)
        eventually(lambda: "greedy" in grammars._compiling)
        other = pool.submit(grammars.matcher, Constraint("regex", "[a-f]{4}-other-tenant"), 30, "other")
        other.result()
        assert not any(h.done() for h in hangs)  # both still waiting: the first in its check, the second for its turn
        for h in hangs:
            with pytest.raises(InvalidRequest) as e:
                h.result()
            assert e.value.reason == "GRAMMAR_TOO_COMPLEX"
    assert grammars._compiling == set()
