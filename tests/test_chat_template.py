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
