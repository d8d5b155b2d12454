"""The systems under test, each serving the same requests: loramux in process and through gRPC,
peft mixed batches, and naive per-request peft serving."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from loramux.bench.metrics import Record
from loramux.bench.workload import Req
from loramux.server.engine.engine import Engine
from loramux.server.engine.inputs import GenerateInput
from loramux.server.engine.request import ErrorEvent, TokenEvent


def _engine_call(engine: Engine, req: Req, use_adapter: bool, arrival: float, sink: queue.Queue,
                 tenant: str = "bench") -> Record:
    """Submit one request; its Record is complete when `sink` gets it."""
    record = Record(arrival, [])

    def emit(event):
        if isinstance(event, TokenEvent):
            record.token_times.append(time.monotonic())
        else:
            sink.put(event.error if isinstance(event, ErrorEvent) else record)

    inp = GenerateInput(adapter_id=req.adapter if use_adapter else "", prompt_token_ids=req.prompt,
                        max_new_tokens=req.output_tokens)
    engine.submit(tenant, inp, emit)
    return record


def _check(result):
    if isinstance(result, BaseException):
        raise result
    return result


def engine_closed_loop(engine: Engine, reqs: list[Req], concurrency: int, use_adapter: bool,
                       tenant: str = "bench") -> list[Record]:
    """`concurrency` clients, each sending its next request when the last one finished."""
    records: list[Record | None] = [None] * len(reqs)
    next_index = iter(range(len(reqs)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client():
        sink: queue.Queue = queue.Queue()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                _engine_call(engine, reqs[i], use_adapter, time.monotonic(), sink, tenant)
                records[i] = _check(sink.get(timeout=600))
            except BaseException as e:
                errors.append(e)
                return

    _run_threads(client, concurrency)
    if errors:
        raise errors[0]
    return records


def engine_poisson(engine: Engine, reqs: list[Req], arrivals: list[float]) -> list[Record]:
    """Open loop: request i is sent at start + arrivals[i], whatever is still running."""
    sink: queue.Queue = queue.Queue()
    start = time.monotonic()
    for req, offset in zip(reqs, arrivals):
        delay = start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        _engine_call(engine, req, True, start + offset, sink)
    return [_check(sink.get(timeout=600)) for _ in reqs]


def _closed_loop(reqs: list[Req], concurrency: int, one: Callable[[int, Req, Record], None]) -> list[Record]:
    """`concurrency` client threads, each sending its next request when its last one finished;
    `one(i, req, record)` sends request i and appends each token's arrival to the record."""
    records: list[Record | None] = [None] * len(reqs)
    next_index = iter(range(len(reqs)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            record = Record(time.monotonic(), [])
            try:
                one(i, reqs[i], record)
            except BaseException as e:
                errors.append(e)
                return
            records[i] = record

    _run_threads(worker, concurrency)
    if errors:
        raise errors[0]
    return records


def grpc_closed_loop(
    target: str, reqs: list[Req], concurrency: int, tracer_provider=None, use_adapter: bool = True, sampling: dict | None = None,
    api_key: str | None = None,
) -> list[Record]:
    """`concurrency` clients streaming through gRPC, each sending its next request when its last
    one finished. `sampling`: temperature, top_p, top_k for every request (seeded by index)."""
    import loramux.client as lc

    with lc.Client(target, timeout=600, tracer_provider=tracer_provider, api_key=api_key) as client:

        def one(i: int, req: Req, record: Record) -> None:
            extra = dict(sampling, seed=i) if sampling else {}
            for chunk in client.generate_stream(adapter_id=req.adapter if use_adapter else "", prompt_token_ids=req.prompt,
                                                max_new_tokens=req.output_tokens, ignore_eos=True, **extra):
                now = time.monotonic()
                record.token_times += [now] * len(chunk.token_ids)

        return _closed_loop(reqs, concurrency, one)


def grpc_load(target: str, reqs: list[Req], concurrency: int, **kwargs) -> tuple[list[Record], float]:
    """`grpc_closed_loop` in a load-generator process of its own: the records, and the CPU
    seconds this process spent on them (the clients' share of the machine's cores)."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu()
    records = grpc_closed_loop(target, reqs, concurrency, **kwargs)
    return records, round(cpu() - before, 3)


class _StepTimes(LogitsProcessor):
    """Records when each generation step's logits are ready (one token per row per step)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.monotonic())
        return scores


def peft_mixed_batches(
    model, reqs: list[Req], concurrency: int, pad_id: int, sampling: dict | None = None, use_adapters: bool = True
) -> list[Record]:
    """`generate` on consecutive batches of `concurrency` requests (peft's `adapter_names` for
    mixed adapters, or a plain model with `use_adapters=False`): each batch's clients send
    their next requests when the batch has finished. Every row generates its requested tokens
    (EOS suppressed until then), greedy or with `sampling`."""
    records = []
    for start in range(0, len(reqs), concurrency):
        batch = reqs[start : start + concurrency]
        longest = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, longest - len(r.prompt):] = 1
        timer = _StepTimes()
        arrival = time.monotonic()
        most = max(r.output_tokens for r in batch)
        extra = {"adapter_names": [r.adapter for r in batch]} if use_adapters else {}
        with torch.inference_mode():
            model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=most,
                min_new_tokens=most, pad_token_id=pad_id, logits_processor=LogitsProcessorList([timer]),
                **extra, **_sampling_kwargs(sampling),
            )
        records += [Record(arrival, timer.times[: r.output_tokens]) for r in batch]
    return records


def _sampling_kwargs(sampling: dict | None) -> dict:
    return {"do_sample": False} if not sampling else {"do_sample": True, **sampling}


def peft_naive(model, reqs: list[Req], concurrency: int, pad_id: int, sampling: dict | None = None) -> list[Record]:
    """One request at a time: `set_adapter` then `generate`. With `concurrency` clients in a
    closed loop, request i is sent when request i - concurrency has finished."""
    records: list[Record] = []
    start = time.monotonic()
    for i, r in enumerate(reqs):
        arrival = records[i - concurrency].token_times[-1] if i >= concurrency else start
        timer = _StepTimes()
        with torch.inference_mode():
            model.set_adapter(r.adapter)
            model.generate(
                input_ids=torch.tensor([r.prompt], device=model.device),
                attention_mask=torch.ones(1, len(r.prompt), dtype=torch.long, device=model.device),
                max_new_tokens=r.output_tokens, min_new_tokens=r.output_tokens, pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([timer]), **_sampling_kwargs(sampling),
            )
        records.append(Record(arrival, timer.times))
    return records


def _run_threads(fn, n: int) -> None:
    threads = [threading.Thread(target=fn, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def http_closed_loop(base_url: str, reqs: list[Req], concurrency: int, api_key: str = "none") -> list[Record]:
    """`grpc_closed_loop` through the OpenAI-compatible HTTP API with the official `openai`
    client: each request streamed as server-sent events (one event per decoded token)."""
    import openai

    with openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600) as client:

        def one(i: int, req: Req, record: Record) -> None:
            stream = client.completions.create(model=req.adapter, prompt=req.prompt, max_tokens=req.output_tokens,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason is None:
                    record.token_times.append(time.monotonic())

        return _closed_loop(reqs, concurrency, one)


def http_load(base_url: str, reqs: list[Req], concurrency: int) -> tuple[list[Record], float]:
    """`http_closed_loop` in a load-generator process, with its CPU seconds (as `grpc_load`)."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    before = cpu()
    records = http_closed_loop(base_url, reqs, concurrency)
    return records, round(cpu() - before, 3)
