"""Queuing the next decode step before handing on the last one's tokens (worker.overlap, on
by default on a GPU): forced on here, it serves exactly what the step-by-step engine serves,
through joins, leaves, sampling, penalties, min_tokens (whose counts run one behind while a
step is in flight), logprobs, stop strings, `n`, structured output (which falls back to step
by step) and cancellations; no event follows a request's last."""

from __future__ import annotations

import concurrent.futures as cf
import threading

import pytest

from conftest import ADAPTERS, PROMPTS
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.request import ErrorEvent, FinishEvent, TokenEvent
from loramux.server.engine.constraints import Constraint
from loramux.server.model.base_model import load_base_model


def engines(assets):
    settings = assets.settings(adapter_slots=5, max_batch_size=4, batch_window_ms=20)
    out = {}
    for overlap in (False, True):
        engine = Engine(settings, load_base_model(settings))
        engine.worker.overlap = overlap
        engine.start()
        for name in ADAPTERS:
            engine.load_adapter("default", name, name)
        out[overlap] = engine
    return out


@pytest.fixture(scope="module")
def both(assets):
    made = engines(assets)
    yield made
    for engine in made.values():
        engine.stop()


def outcome(engine, inp: GenerateInput, n: int = 1):
    """Every completion's events, in order: token ids, logprobs, texts, alternatives, and how it ended."""
    done = threading.Event()
    events: list[list] = [[] for _ in range(n)]
    left = [n]
    lock = threading.Lock()

    def emit_to(i):
        def emit(event):
            events[i].append(event)
            if isinstance(event, (FinishEvent, ErrorEvent)):
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return emit

    engine.submit_many("default", inp, [emit_to(i) for i in range(n)], None)
    assert done.wait(120)
    engine.call_on_engine(lambda: None).result(60)  # a pass boundary: a step in flight has been handed on
    summary = []
    for completion in events:
        assert sum(isinstance(e, (FinishEvent, ErrorEvent)) for e in completion) == 1  # the last, and only one
        tokens = [(e.token_ids, e.logprobs, e.text, e.top_logprobs) for e in completion if isinstance(e, TokenEvent)]
        last = completion[-1]
        end = (last.finish_reason, last.text, last.completion_tokens) if isinstance(last, FinishEvent) else \
            (type(last.error).__name__, last.error.reason)
        summary.append((tokens, end))
    return summary


REQUESTS = [
    GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n)
    for (a, p), n in zip([(a, p) for p in PROMPTS[:2] for a in ["", *ADAPTERS]], [3, 9, 5, 12, 2, 7, 4, 11, 6, 8, 1, 10])
] + [
    GenerateInput(adapter_id="all-r16", prompt=PROMPTS[0], max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.9,
                  seed=5, repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.2, min_tokens=6,
                  ignore_eos=True, return_logprobs=True, top_logprobs=3),
    GenerateInput(adapter_id="qv-r4", prompt=PROMPTS[1], max_new_tokens=12, temperature=1.1, min_p=0.05, seed=9,
                  stop=[" the"], logit_bias={5: 2.0}),
    GenerateInput(prompt=PROMPTS[3], max_new_tokens=8, temperature=0.8, seed=3, return_logprobs=True),
    GenerateInput(adapter_id="pattern", prompt=PROMPTS[2], max_new_tokens=9, constraint=Constraint(
        "regex", "(fox|dog)( (fox|dog)){0,6}")),
    # Token 40 is always the most likely and ends the row, but not before 5 tokens: a min_tokens
    # count one off (while a step is in flight) would end it a token early or late.
    GenerateInput(adapter_id="rslora-r8", prompt=PROMPTS[0], max_new_tokens=12, logit_bias={40: 100.0},
                  stop_token_ids=[40], min_tokens=5),
    GenerateInput(prompt=PROMPTS[1], max_new_tokens=12, logit_bias={40: 100.0}, stop_token_ids=[40], min_tokens=3,
                  temperature=0.7, seed=2),
]


# This one's samples depend on which rows share its batch (float32 sums in other shapes move a
# nucleus boundary), and with the torch kernel on which adapters the decode buffer holds from
# earlier batches (its width changes the GEMMs' order of sums): it is compared alone, first,
# on engines with the same history, the others together after.
ALONE = {12}


def test_overlapped_steps_serve_what_steps_one_by_one_serve(both):
    results = {}
    together = [inp for i, inp in enumerate(REQUESTS) if i not in ALONE]
    for overlap, engine in both.items():
        first = [outcome(engine, REQUESTS[i]) for i in sorted(ALONE)] + [outcome(engine, REQUESTS[12], 3)]
        with cf.ThreadPoolExecutor(len(together) + 1) as pool:  # more requests than rows: joins while rows decode
            futures = [pool.submit(outcome, engine, inp) for inp in together]
            futures.append(pool.submit(outcome, engine, REQUESTS[13], 2))  # n = 2, sharing a prefill
            results[overlap] = [f.result() for f in futures] + first  # in REQUESTS' order, the first last
    assert results[True] == results[False]
    assert both[True].worker.launched > 0 and both[False].worker.launched == 0
    for overlap in (False, True):  # the min_tokens rows: 5 and 3 tokens before the stop token
        assert [r[0][1][2] for r in results[overlap][-5:-3]] == [6, 4]


def test_overlapped_greedy_tokens_equal_peft(assets, both):
    jobs = [(a, p, 6) for p in PROMPTS[:3] for a in ["", *ADAPTERS]]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(both[True].generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n),
                               120) for a, p, n in jobs]
        got = [f.result()["token_ids"] for f in futures]
    for (adapter, prompt, n), tokens in zip(jobs, got):
        assert tokens == assets.oracle(adapter or None, prompt, n), (adapter, prompt)


def test_a_cancelled_row_ends_alone_and_the_others_go_on(assets, both):
    engine = both[True]
    first_token = threading.Event()
    events = []

    def emit(event):
        events.append(event)
        if isinstance(event, TokenEvent):
            first_token.set()

    request = engine.submit("default", GenerateInput(prompt=PROMPTS[0], max_new_tokens=200, ignore_eos=True), emit)
    other = cf.ThreadPoolExecutor(1).submit(engine.generate, "default",
                                            GenerateInput(adapter_id="all-r16", prompt=PROMPTS[1], max_new_tokens=8), 120)
    assert first_token.wait(60)
    engine.cancel(request)
    assert other.result(120)["token_ids"] == assets.oracle("all-r16", PROMPTS[1], 8)
    engine.call_on_engine(lambda: None).result(60)  # a pass boundary: a step in flight has been handed on
    ends = [e for e in events if isinstance(e, (ErrorEvent, FinishEvent))]
    assert len(ends) == 1 and ends[0] is events[-1]
    assert isinstance(ends[0], ErrorEvent) and ends[0].error.reason == "CANCELLED"
    assert sum(len(e.token_ids) for e in events if isinstance(e, TokenEvent)) < 200
