"""Chat templates with tools, message fields and template variables, and a template that fails
being the request's error (INVALID_ARGUMENT naming the template), never INTERNAL."""

import copy

import grpc

import pytest

from loramux.server.engine.inputs import GenerateInput, render_chat
from loramux.server.errors import InvalidRequest

TEMPLATE = (
    "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}]{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'boom' %}{{ raise_exception('no boom role here') }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}"
    "{% if m.get('tool_calls') %}{call:{{ m['tool_calls'][0]['function']['name'] }}}{% endif %}"
    "{% if m.get('tool_call_id') %}{id:{{ m['tool_call_id'] }}}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    "{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def tokenizer(assets):
    tok = copy.deepcopy(assets.tokenizer)
    tok.chat_template = TEMPLATE
    return tok


def test_tools_message_fields_and_variables_reach_the_template(tokenizer):
    inp = GenerateInput(
        messages=[("user", "rain?"), ("assistant", ""), ("tool", "sunny")],
        message_extras=[{}, {"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
                        {"tool_call_id": "c1"}],
        tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert render_chat(tokenizer, inp) == "[tools:weather;]<user>rain?<assistant>{call:weather}<tool>sunny{id:c1}<assistant>/no_think"
    plain = GenerateInput(messages=[("user", "hi")])
    assert render_chat(tokenizer, plain) == "<user>hi<assistant>"


def test_a_template_that_fails_is_the_requests_error(tokenizer):
    with pytest.raises(InvalidRequest) as e:
        render_chat(tokenizer, GenerateInput(messages=[("boom", "x")]))
    assert e.value.reason == "CHAT_TEMPLATE_FAILED" and e.value.field == "messages" and "no boom role here" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        render_chat(tokenizer, GenerateInput(messages=[("user", "x")], chat_template_kwargs={"add_generation_prompt": False}))
    assert e.value.field == "chat_template_kwargs"


def test_chat_fields_through_http_and_grpc(assets):
    import openai

    import loramux.client as lc
    from loramux.client.errors import InvalidArgument
    from loramux.server.app import BackgroundServer
    from loramux.v1 import loramux_service_pb2_grpc

    with BackgroundServer(assets.settings(http_port=0)) as srv:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x", max_retries=0)
        base = srv.engine.settings.public_model_name
        messages = [{"role": "user", "content": "fox"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                          "function": {"name": "weather", "arguments": "{}"}}]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
        answer = client.chat.completions.create(model=base, messages=messages, tools=TOOLS, tool_choice="auto",
                                                max_tokens=3, temperature=0,
                                                extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert answer.usage.completion_tokens == 3
        # A forced call cut short by max_tokens is the text so far (test_structured_output.py has whole ones).
        cut = client.chat.completions.create(model=base, messages=messages[:1], tools=TOOLS, tool_choice="required",
                                             max_tokens=2, temperature=0)
        assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.tool_calls is None
        assert cut.choices[0].message.content.startswith("[")
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=base, messages=messages[:1], max_tokens=2,
                                           extra_body={"chat_template_kwargs": {"tokenize": True}})
        assert e.value.param == "chat_template_kwargs"
        with lc.Client(srv.target, timeout=60) as grpc_client:
            result = grpc_client.generate(messages=messages, tools=TOOLS, max_new_tokens=3)
            assert result.usage.completion_tokens == 3
            with pytest.raises(InvalidArgument) as e:
                grpc_client.generate(messages=[{"role": "user", "content": "x"}], max_new_tokens=2,
                                     chat_template_kwargs={"messages": []})
            assert e.value.reason == "INVALID_PARAMETER" and "chat_template_kwargs" in e.value.message
            request = lc._convert.generate_request(messages=[{"role": "user", "content": "x"}], max_new_tokens=2)
            request.tools_json = "[{not json"
            with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as e:
                loramux_service_pb2_grpc.LoramuxStub(channel).Generate(request, timeout=30)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "tools_json" in e.value.details()


ADAPTER_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}|{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}[bot|{% endif %}"


def test_an_adapter_s_own_chat_template_renders_its_requests(assets, tmp_path):
    """chat_template.jinja (or tokenizer_config.json's chat_template) in an adapter's
    directory: its requests' messages are rendered with it, the base's and other adapters'
    are not; Tokenize says so; a template that does not compile, a huge or non-UTF-8 file, a
    FIFO or a link out of the root refuse the load with ADAPTER_CHAT_TEMPLATE_INVALID."""
    import json
    import os

    import openai

    import loramux.client as lc
    from loramux.server.app import BackgroundServer
    from loramux.server.errors import LoramuxError

    own = assets.copy_adapter("qv-r4", "with-template")
    (own / "chat_template.jinja").write_text(ADAPTER_TEMPLATE)
    named = assets.copy_adapter("mlp-r2", "with-config-template")
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": ADAPTER_TEMPLATE}]}))
    messages = [{"role": "user", "content": "the quick brown"}]
    ours = assets.tokenizer.apply_chat_template(messages, chat_template=ADAPTER_TEMPLATE, add_generation_prompt=True,
                                                tokenize=False)
    assert ours == "[user|the quick brown][bot|"
    ids = assets.tokenizer(ours, add_special_tokens=False)["input_ids"]
    base_ids = assets.tokenizer(assets.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    assert ids != base_ids
    bad = {
        "syntax": ("chat_template.jinja", "{% for m in messages %}"),
        "binary": ("chat_template.jinja", b"\xff\xfe"),
        "huge": ("chat_template.jinja", "x" * (256 * 1024 + 1)),
        "not-json": ("tokenizer_config.json", "{"),
        "not-a-string": ("tokenizer_config.json", '{"chat_template": 3}'),
    }
    for name, (file, content) in bad.items():
        directory = assets.copy_adapter("qv-r4", f"bad-template-{name}")
        path = directory / file
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    fifo = assets.copy_adapter("qv-r4", "bad-template-fifo")
    os.mkfifo(fifo / "chat_template.jinja")
    outside = assets.copy_adapter("qv-r4", "bad-template-link")
    (tmp_path / "elsewhere.jinja").write_text(ADAPTER_TEMPLATE)
    (outside / "chat_template.jinja").symlink_to(tmp_path / "elsewhere.jinja")
    with BackgroundServer(assets.settings(http_port=0)) as srv:
        for name in ("qv-r4", "with-template", "with-config-template"):
            srv.engine.load_adapter("default", name, name)
        for name in [*(f"bad-template-{n}" for n in bad), "bad-template-fifo"]:
            with pytest.raises(LoramuxError) as e:
                srv.engine.load_adapter("default", name, name)
            assert e.value.reason == "ADAPTER_CHAT_TEMPLATE_INVALID", (name, e.value.message)
        with pytest.raises(LoramuxError) as e:
            srv.engine.load_adapter("default", "bad-template-link", "bad-template-link")
        assert e.value.reason == "SOURCE_OUTSIDE_ROOT"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.running.http_port}/v1", api_key="x", max_retries=0)
        for model in ("with-template", "with-config-template"):
            answer = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
            alone = client.completions.create(model=model, prompt=list(ids), max_tokens=4, temperature=0)
            assert answer.choices[0].message.content == alone.choices[0].text
            assert answer.usage.prompt_tokens == len(ids)
        plain = client.chat.completions.create(model="qv-r4", messages=messages, max_tokens=4, temperature=0)
        assert plain.usage.prompt_tokens == len(base_ids)
        with lc.Client(srv.target, timeout=60) as grpc_client:
            assert grpc_client.tokenize(messages=messages, adapter_id="with-template").token_ids == ids
            assert grpc_client.tokenize(messages=messages).token_ids == base_ids
        url = f"http://127.0.0.1:{srv.running.http_port}/tokenize"
        import httpx2 as httpx
        assert httpx.post(url, json={"model": "with-config-template", "messages": messages}).json()["tokens"] == ids
