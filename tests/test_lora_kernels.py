"""The Triton LoRA kernels (`--lora-kernel triton`), run on the CPU by Triton's interpreter:
the same arithmetic as the eager path to float32 rounding, each row reading only its own
adapter, and greedy tokens through the engine equal to peft's."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton compiles anything: kernels run on the CPU

import concurrent.futures as cf  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from conftest import ADAPTERS, PROMPTS  # noqa: E402
from loramux.server.engine.engine import Engine  # noqa: E402
from loramux.server.engine.inputs import GenerateInput  # noqa: E402
from loramux.server.errors import InvalidSettings  # noqa: E402
from loramux.server.lora import triton_kernels  # noqa: E402
from loramux.server.lora.slot_linear import LoraRouting, RoutingPlan, SlotLinear  # noqa: E402
from loramux.server.model.base_model import load_base_model  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernels.triton.knobs.runtime.interpret,
                                reason="Triton's interpreter was not on when Triton loaded")


def reference(y, x, a, b, first, rank, scale, tokens_per_row):
    """Each token's delta in float64 from its own adapter's columns, added to y."""
    out = y.double().clone()
    for t in range(x.shape[0]):
        row = t // tokens_per_row
        f, r = int(first[row]), int(rank[row])
        if r:
            out[t] += (a[f:f + r].double() @ x[t].double()) @ b[f:f + r].double() * float(scale[row])
    return out


@pytest.mark.parametrize("y_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("tokens_per_row", [1, 3])
def test_kernels_add_each_tokens_own_adapter(y_dtype, w_dtype, tokens_per_row):
    gen = torch.Generator().manual_seed(7)
    columns, in_f, out_f = 44, 70, 130  # neither width a multiple of the blocks
    a = torch.randn(columns, in_f, generator=gen).to(w_dtype)
    b = torch.randn(columns, out_f, generator=gen).to(w_dtype)
    first = torch.tensor([0, 8, 8, 20, 0, 40], dtype=torch.int32)
    rank = torch.tensor([8, 12, 12, 20, 0, 4], dtype=torch.int32)  # row 4: no adapter
    scale = torch.tensor([0.5, 2.0, 2.0, 1 / 3, 0.0, 4.0])
    tokens = len(first) * tokens_per_row
    x = torch.randn(tokens, in_f, generator=gen).to(y_dtype)
    y = (torch.randn(tokens, out_f, generator=gen) * 10).to(y_dtype)
    got = triton_kernels.lora_add_(y.clone(), x, a, b, first, rank, scale, 20, tokens_per_row)
    want = reference(y, x, a, b, first, rank, scale, tokens_per_row)
    assert got.dtype == y_dtype
    if y_dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    else:  # the float32 sum rounded once: within one unit in the last place of the rounded exact sum
        exact = want.to(y_dtype)
        ulp = (exact.double().abs() * torch.finfo(y_dtype).eps).clamp_min(torch.finfo(y_dtype).tiny)
        assert ((got.double() - exact.double()).abs() <= ulp).all()
    base_rows = slice(4 * tokens_per_row, 5 * tokens_per_row)
    assert torch.equal(got[base_rows], y[base_rows])  # a row without an adapter is left as it was


def layers(kernel_slots=3, rank=4, bias=True):
    torch.manual_seed(0)
    base = nn.Linear(6, 5, bias=bias)
    out = {}
    for kernel in ("torch", "triton"):
        routing = LoraRouting()
        layer = SlotLinear(nn.Linear(6, 5, bias=bias), kernel_slots, routing, kernel=kernel)
        layer.base_layer.load_state_dict(base.state_dict())
        out[kernel] = (layer, routing)
    return out


def plan(slots: list[int], base_slot: int = 3) -> RoutingPlan:
    groups: dict[int, list[int]] = {}
    for row, slot in enumerate(slots):
        if slot != base_slot:
            groups.setdefault(slot, []).append(row)
    return RoutingPlan(slots=slots, groups=[(s, torch.tensor(r)) for s, r in groups.items()], device=torch.device("cpu"))


@pytest.mark.parametrize("tokens", [1, 4])  # a decode step and a prefill
def test_slot_layer_with_triton_equals_the_torch_path(tokens):
    both = layers()
    gen = torch.Generator().manual_seed(3)
    weights = [(torch.randn(r, 6, generator=gen), torch.randn(5, r, generator=gen), s)
               for r, s in ((4, 0.5), (2, 2.0), (3, 1.25))]
    for layer, _ in both.values():
        for slot, (a, b, s) in enumerate(weights):
            layer.fill(slot, a, b, s)
    x = torch.randn(5, tokens, 6, generator=gen)
    for slots in ([0, 1, 3, 2, 1], [2, 2, 2, 2, 2], [3, 3, 0, 3, 3]):
        outs = {}
        for kernel, (layer, routing) in both.items():
            routing.plan, routing.tokens = plan(slots), tokens
            outs[kernel] = layer(x)
        torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
    layer, _ = both["triton"]
    assert layer.buffer_layout().view.hide is None  # no mask is built for the kernels


def test_an_adapter_that_overflows_stays_in_its_own_rows():
    (layer, routing) = layers()["triton"]
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 0.5)
    layer.fill(1, torch.full((2, 6), 3e38), torch.zeros(5, 2), 1.0)  # x @ A overflows; B = 0
    x = torch.rand(3, 1, 6) + 0.5
    routing.plan, routing.tokens = plan([0, 1, 3]), 1
    y = layer(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
    routing.plan = plan([0, 3, 0])  # its columns left behind in the buffer: never read
    assert torch.isfinite(layer(x)).all()


def test_engine_with_triton_kernels_equals_peft(assets):
    settings = assets.settings(lora_kernel="triton", adapter_slots=5, max_batch_size=8)
    engine = Engine(settings, load_base_model(settings)).start()
    try:
        for name in ADAPTERS:
            engine.load_adapter("default", name, name)
        jobs = [(a, p) for p in PROMPTS[:2] for a in ["", *ADAPTERS]]
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # mixed batches
            futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=6), 120)
                       for a, p in jobs]
            results = [f.result()["token_ids"] for f in futures]
    finally:
        engine.stop()
    for (adapter, prompt), tokens in zip(jobs, results):
        assert tokens == assets.oracle(adapter or None, prompt, 6), (adapter, prompt)


def test_triton_kernels_are_refused_where_they_cannot_run(assets):
    with pytest.raises(InvalidSettings) as e:
        assets.settings(lora_kernel="triton", compile=True)
    assert e.value.field == "lora_kernel"
    knobs = triton_kernels.triton.knobs.runtime
    knobs.interpret = False
    try:
        with pytest.raises(InvalidSettings) as e:
            load_base_model(assets.settings(lora_kernel="triton", device="cpu"))
        assert e.value.field == "lora_kernel" and "CUDA" in str(e.value)
    finally:
        knobs.interpret = True


def test_a_prefill_places_its_adapters_without_moving_the_running_ones():
    (layer, routing) = layers(kernel_slots=3)["triton"]
    gen = torch.Generator().manual_seed(5)
    for slot, rank in ((0, 4), (1, 2), (2, 3)):
        layer.fill(slot, torch.randn(rank, 6, generator=gen), torch.randn(5, rank, generator=gen), 1.0)
    routing.plan, routing.tokens = plan([0, 1]), 1  # the running batch decodes with slots 0 and 1
    layer(torch.randn(2, 1, 6, generator=gen))
    running = {s: layer.buffer_layout().segments[s] for s in (0, 1)}
    routing.plan, routing.tokens = plan([2]), 4  # a prefill of one joining row, slot 2 only
    layer(torch.randn(1, 4, 6, generator=gen))
    segments = layer.buffer_layout().segments
    assert {s: segments[s] for s in (0, 1)} == running and segments[2][0] == 6  # appended after them
