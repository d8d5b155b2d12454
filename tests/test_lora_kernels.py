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
from loramux.server.lora.weights import AdapterWeights, ModuleLora  # noqa: E402
from loramux.server.model.base_model import load_base_model  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_kernels.triton.knobs.runtime.interpret,
                                reason="Triton's interpreter was not on when Triton loaded")


def tables_of(adapters, w_dtype):
    """Slot tables over adapters [(A^T [in, r], B^T [r, out], scale)], and one empty slot last."""
    from loramux.server.lora.slot_linear import SlotTables

    held = [(a.to(w_dtype).contiguous(), b.to(w_dtype).contiguous(), s) for a, b, s in adapters]
    tables = SlotTables(torch.tensor([a.data_ptr() for a, _, _ in held] + [0], dtype=torch.int64),
                        torch.tensor([b.data_ptr() for _, b, _ in held] + [0], dtype=torch.int64),
                        torch.tensor([a.shape[1] for a, _, _ in held] + [0], dtype=torch.int64),
                        torch.tensor([s for _, _, s in held] + [0.0], dtype=torch.float32),
                        torch.empty(0, dtype=w_dtype))
    return tables, held  # (the tables hold addresses: the tensors must stay alive)


def lora_add_(y, x, tables, slots, max_rank, tokens_per_row):
    """y [tokens, out] += each token's LoRA delta: one layer's shrink and expansion."""
    h = triton_kernels.shrink(x.contiguous(), [tables], slots, max_rank, tokens_per_row)
    return triton_kernels.expand_add_(y, h[0], tables, slots, tokens_per_row)


def reference(y, x, held, slots, tokens_per_row, magnitude=False):
    """Each token's delta in float64 from its own adapter, added to y (`magnitude`: the same
    over absolute values, the scale of the rounding a float32 sum of those terms may carry)."""
    f = (lambda t: t.double().abs()) if magnitude else (lambda t: t.double())
    out = f(y).clone()
    for t in range(x.shape[0]):
        slot = int(slots[t // tokens_per_row])
        if slot < len(held):
            a, b, scale = held[slot]
            out[t] += (f(x[t]) @ f(a)) @ f(b) * (abs(scale) if magnitude else scale)
    return out


def random_adapters(gen, in_f, out_f, ranks_scales):
    return [(torch.randn(in_f, r, generator=gen), torch.randn(r, out_f, generator=gen), s) for r, s in ranks_scales]


@pytest.mark.parametrize("y_dtype, w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("tokens_per_row", [1, 3, 37])  # a decode step; prefills of one tile and of three
def test_kernels_add_each_tokens_own_adapter(y_dtype, w_dtype, tokens_per_row):
    gen = torch.Generator().manual_seed(7)
    in_f, out_f = 70, 130  # neither width a multiple of the blocks
    tables, held = tables_of(random_adapters(gen, in_f, out_f, ((8, 0.5), (12, 2.0), (40, 1 / 3), (4, 4.0))), w_dtype)
    slots = torch.tensor([0, 1, 1, 2, 4, 3])  # row 4: the empty slot; rank 40 spans two decode and three prefill rank blocks
    tokens = len(slots) * tokens_per_row
    x = torch.randn(tokens, in_f, generator=gen).to(y_dtype)
    y = (torch.randn(tokens, out_f, generator=gen) * 10).to(y_dtype)
    got = lora_add_(y.clone(), x, tables, slots, 40, tokens_per_row)
    want = reference(y, x, held, slots, tokens_per_row)
    assert got.dtype == y_dtype
    if y_dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    else:  # the float32 sum rounded once: within one unit in the last place of the rounded exact
        # sum, plus what float32 arithmetic over these terms may lose (where y and the delta cancel)
        exact = want.to(y_dtype)
        ulp = (exact.double().abs() * torch.finfo(y_dtype).eps).clamp_min(torch.finfo(y_dtype).tiny)
        float32 = 2 * in_f * torch.finfo(torch.float32).eps * reference(y, x, held, slots, tokens_per_row, True)
        assert ((got.double() - exact.double()).abs() <= ulp + float32).all()
    base_rows = slice(4 * tokens_per_row, 5 * tokens_per_row)
    assert torch.equal(got[base_rows], y[base_rows])  # a row without an adapter is left as it was


@pytest.mark.parametrize("tokens_per_row", [1, 21])
def test_one_shrink_launch_for_siblings_equals_a_launch_each(tokens_per_row):
    """Three layers' tables in one launch: each part is exactly its own launch's."""
    gen = torch.Generator().manual_seed(11)
    in_f, rows = 70, 4
    x = torch.randn(rows * tokens_per_row, in_f, generator=gen)
    layers_ = [tables_of(random_adapters(gen, in_f, 9, ranks), torch.float32)
               for ranks in (((8, 1.0), (30, 1.0)), ((2, 1.0), (12, 1.0)), ((16, 1.0), (24, 1.0)))]
    slots = torch.tensor([0, 2, 1, 0])  # (slot 2: the empty one)
    width = 30
    together = triton_kernels.shrink(x, [t for t, _ in layers_], slots, width, tokens_per_row)
    for s_, (tables, held) in enumerate(layers_):
        alone = triton_kernels.shrink(x, [tables], slots, width, tokens_per_row)[0]
        for t in range(x.shape[0]):
            slot = int(slots[t // tokens_per_row])
            r = int(tables.rank[slot])
            assert torch.equal(together[s_, t, :r], alone[t, :r])
            if r:
                torch.testing.assert_close(alone[t, :r].double(), x[t].double() @ held[slot][0].double(),
                                           rtol=1e-5, atol=1e-5)


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
    assert layer.buffer_layout().columns == 0  # the kernels read the slots: nothing is copied per batch


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
        groups = engine.base.bank.siblings
    finally:
        engine.stop()
    for (adapter, prompt), tokens in zip(jobs, results):
        assert tokens == assets.oracle(adapter or None, prompt, 6), (adapter, prompt)
    assert groups and all(g.enabled and g.shared > 0 for g in groups)  # q/k/v and gate/up shared their shrinks


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


def test_a_slot_refilled_or_cleared_is_what_the_next_pass_reads():
    """The tables change in place: a pass after a refill reads the new weights, one after a
    clear adds nothing, and the tables' tensors are the same objects throughout."""
    both = layers()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 6, generator=gen)
    tables = both["triton"][0].tables
    held = (tables.a, tables.b, tables.rank, tables.scale)
    other = (torch.randn(3, 6, generator=gen), torch.randn(5, 3, generator=gen), 1.5)
    for layer, _ in both.values():
        layer.fill(1, *other)
    for weights in [(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen), 0.5),
                    (torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 2.0), None]:
        outs = {}
        for kernel, (layer, routing) in both.items():
            if weights is None:
                layer.clear(0)
            else:
                layer.fill(0, *weights)
            routing.plan, routing.tokens = plan([0, 3, 1]), 1  # (slot 1 keeps the kernels running after the clear)
            outs[kernel] = layer(x)
        torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
        if weights is None:
            assert torch.equal(outs["triton"][0], both["triton"][0].base_layer(x)[0])  # slot 0's row: its base output
    assert (tables.a, tables.b, tables.rank, tables.scale) == held and int(tables.rank[0]) == 0


def llama_bank(kernel="triton"):
    """A two-layer Llama whose seven projections are slot layers, three adapters filled."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramux.server.lora.slot_bank import SlotBank

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=64)
    model = LlamaForCausalLM(config).eval()
    bank = SlotBank(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 3, 8,
                    kernel=kernel)
    gen = torch.Generator().manual_seed(2)
    for uid, (rank, targets) in enumerate(((8, ("q", "k", "v", "gate", "up")), (4, ("k", "down", "up")),
                                           (2, ("q", "v", "o", "gate")))):
        bank.place(uid, AdapterWeights(modules={
            name: ModuleLora(a=torch.randn(rank, layer.in_features, generator=gen) * 0.3,
                             b=torch.randn(layer.out_features, rank, generator=gen) * 0.3, scale=0.5 + uid)
            for name, layer in bank.layers.items() if name.rsplit(".", 1)[-1].split("_")[0] in targets}))
    return model, bank


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("uids", [[0, 1, None, 2], [1, 2, None, 1]])  # equal widths; q 2, k 4, v 2 (one launch 4 wide)
def test_siblings_share_one_shrink_and_serve_what_separate_layers_serve(tokens, uids):
    """q/k/v and gate/up take their parts of one launch (three shared parts per decoder layer),
    and the model's output equals the torch path's."""
    outs = {}
    for kernel in ("torch", "triton"):
        model, bank = llama_bank(kernel)
        ids = torch.randint(0, 64, (4, tokens), generator=torch.Generator().manual_seed(4))
        plan_ = bank.plan(uids, torch.device("cpu"))
        bank.route(plan_, tokens)
        with torch.inference_mode():
            outs[kernel] = model(input_ids=ids, use_cache=False).logits
        bank.route(None)
        assert [len(g.layers) for g in bank.siblings] == [3, 3, 2, 2]  # q/k/v per layer, then gate/up
        # (the torch path's masked GEMMs have no launch to share)
        assert [g.shared for g in bank.siblings] == ([2, 2, 1, 1] if kernel == "triton" else [0, 0, 0, 0])
        assert all(g.enabled for g in bank.siblings)  # (the checks found each part equal to its own launch's)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)


class _ChangesItsInput(nn.Module):
    """A module that changes the shared input in place between its siblings' calls."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x):
        q = self.q_proj(x)
        x.mul_(2)
        return q, self.k_proj(x)


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_a_model_that_changes_the_shared_input_is_not_served_a_stale_shrink(mode):
    from loramux.server.lora.slot_bank import SlotBank

    results = {}
    for kernel in ("torch", "triton"):
        torch.manual_seed(0)
        module = _ChangesItsInput()
        bank = SlotBank(module, ("q_proj", "k_proj"), 2, 4, kernel=kernel)
        bank.place(0, AdapterWeights(modules={name: ModuleLora(a=torch.randn(4, 6), b=torch.randn(5, 4), scale=1.5)
                                              for name in bank.layers}))
        bank.route(bank.plan([0, None], torch.device("cpu")), 1)
        context = torch.inference_mode() if mode == "inference" else torch.no_grad()
        with context:
            results[kernel] = module(torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(1)))
        if kernel == "triton":
            group, = bank.siblings
            assert group.shared == 0
            assert group.enabled == (mode == "no_grad")  # versions tell it apart; inference tensors need the check
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _serve(settings, jobs, n):
    engine = Engine(settings, load_base_model(settings)).start()
    try:
        for name in {a for a, _ in jobs if a}:
            engine.load_adapter("default", name, name)
        with cf.ThreadPoolExecutor(len(jobs)) as pool:  # mixed batches
            futures = [pool.submit(engine.generate, "default", GenerateInput(adapter_id=a, prompt=p, max_new_tokens=n),
                                   120) for a, p in jobs]
            return [f.result()["token_ids"] for f in futures], engine.base.bank
    finally:
        engine.stop()


def test_dora_rows_beside_kernel_rows_equal_peft(assets):
    """A batch with a DoRA adapter takes the torch path on the layers it targets; its siblings
    without one still run the kernels (and share nothing with the DoRA layers)."""
    from loramux.demo.assets import make_adapter

    name = "dora-kernels"
    if not (assets.adapters / name).exists():
        make_adapter(assets.base, assets.adapters / name, use_dora=True, r=4, alpha=8,
                     target_modules=("q_proj", "v_proj", "up_proj"), seed=31)
    jobs = [(a, p) for p in PROMPTS[:2] for a in (name, "all-r16", "rslora-r8", "")]
    got, _ = _serve(assets.settings(lora_kernel="triton", adapter_slots=4, max_batch_size=8, batch_window_ms=50),
                    jobs, 6)
    for (adapter, prompt), tokens in zip(jobs, got):
        assert tokens == assets.oracle(adapter or None, prompt, 6), (adapter, prompt)


def test_an_int8_base_with_the_kernels_serves_what_the_torch_path_serves(assets):
    """The kernels add to whatever the base layer returns: with torchao's int8 Linears the
    tokens are the torch path's on the same quantized base."""
    jobs = [(a, p) for p in PROMPTS[:2] for a in ("all-r16", "pattern", "")]
    got = {kernel: _serve(assets.settings(quantization="int8", lora_kernel=kernel, adapter_slots=4, max_batch_size=8),
                          jobs, 6)[0] for kernel in ("torch", "triton")}
    assert got["triton"] == got["torch"]


@pytest.mark.parametrize("arch", [90, 80])  # H100/H200, A100
def test_the_kernels_compile_for_the_gpus_they_serve(arch, tmp_path):
    """Lowered to PTX and assembled by Triton's own ptxas for the architecture, here without a
    GPU (tests/compile_kernels.py): every kernel, for float32 LoRA weights on bfloat16, float16
    and float32 models, and bfloat16 weights (--lora-dtype serving). The interpreter checks the
    arithmetic; this checks what only a compiler sees (types, `tl.dot` operands, the siblings'
    pointer selection, shared memory within a streaming multiprocessor's)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not found in a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py")), str(arch)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    compiled = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    kernels = {"_shrink_kernel", "_shrink_tiles_kernel", "_expand_add_kernel", "_expand_tiles_kernel"}
    assert len(compiled) == 4 * 6 and {c["kernel"] for c in compiled} == kernels
    assert all(c["cubin_bytes"] > 0 and c["shared"] <= 48 * 1024 for c in compiled)


KERNEL_CASES = int(os.environ.get("LORAMUX_KERNEL_CASES", "12"))  # `make fuzz` runs many more


def test_random_shapes_ranks_and_siblings_equal_the_float64_reference():
    """Random widths (not multiples of any block), ranks from 1 to 70, rows of several slots
    (some empty), decode steps and prompts of 2 to 40 tokens, one to three sibling layers in
    one launch, float32 or bfloat16 weights: every token's delta is its own adapter's."""
    rng = torch.Generator().manual_seed(2026)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for case in range(KERNEL_CASES):
        in_f, rows, slots_n = pick(1, 150), pick(1, 7), pick(1, 4)
        tokens_per_row = 1 if case % 2 == 0 else pick(2, 40)
        w_dtype = torch.bfloat16 if case % 3 == 2 else torch.float32
        siblings = pick(1, 3)
        layers_ = []
        for _ in range(siblings):
            out_f = pick(1, 150)
            adapters = random_adapters(rng, in_f, out_f, [(pick(1, 70), float(torch.rand(1, generator=rng)) * 4 - 2)
                                                          for _ in range(slots_n)])
            layers_.append((out_f, *tables_of(adapters, w_dtype)))
        slots = torch.randint(0, slots_n + 1, (rows,), generator=rng)  # slots_n: the empty slot
        x = torch.randn(rows * tokens_per_row, in_f, generator=rng)
        width = max(int(t.rank.max()) for _, t, _ in layers_)
        h = triton_kernels.shrink(x, [t for _, t, _ in layers_], slots, width, tokens_per_row)
        for s_, (out_f, tables, held) in enumerate(layers_):
            y = torch.randn(x.shape[0], out_f, generator=rng)
            got = triton_kernels.expand_add_(y.clone(), h[s_], tables, slots, tokens_per_row)
            want = reference(y, x, held, slots, tokens_per_row)
            scale = reference(y, x, held, slots, tokens_per_row, magnitude=True)
            bound = 4 * (in_f + width) * torch.finfo(torch.float32).eps * scale + 1e-6
            assert ((got.double() - want).abs() <= bound).all(), (case, in_f, out_f, rows, tokens_per_row, siblings)


class _Counted:
    """A Triton kernel whose launches are counted (it still runs)."""

    def __init__(self, kernel, counts: dict, name: str):
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counts[self.name] = self.counts.get(self.name, 0) + 1
            return launch(*args, **kwargs)
        return run


@pytest.mark.parametrize("tokens", [1, 6])
def test_launches_per_layer_are_eleven_whatever_the_number_of_adapters(tokens, monkeypatch):
    """With all seven projections targeted, a pass launches per decoder layer five shrinks'
    worth in two (q/k/v, gate/up) plus o and down, and seven expansions: 11, for one adapter
    in the batch as for three distinct ones (the claim the docs make for decode and prefill)."""
    counts: dict[str, int] = {}
    for name in ("_shrink_kernel", "_shrink_tiles_kernel", "_expand_add_kernel", "_expand_tiles_kernel"):
        monkeypatch.setattr(triton_kernels, name, _Counted(getattr(triton_kernels, name), counts, name))
    model, bank = llama_bank("triton")
    layers_ = model.config.num_hidden_layers
    for layer in bank.layers.values():  # every projection targeted by every adapter
        for slot in range(3):
            if not layer.ranks[slot]:
                layer.fill(slot, torch.randn(2, layer.in_features), torch.randn(layer.out_features, 2), 1.0)

    def run(uids):
        bank.route(bank.plan(uids, torch.device("cpu")), tokens)
        with torch.inference_mode():
            model(input_ids=torch.randint(0, 64, (4, tokens)), use_cache=False)
        bank.route(None)

    for _ in range(4):  # the groups' first parts are checked against launches of their own (extra launches)
        run([0, 1, None, 2])
    assert all(g.checks_left == 0 for g in bank.siblings)
    per_batch = {}
    for uids in ([0, 0, 0, 0], [0, 1, None, 2]):
        counts.clear()
        run(uids)
        per_batch[tuple(uids)] = dict(counts)
    shrink, expand = ("_shrink_kernel", "_expand_add_kernel") if tokens == 1 else ("_shrink_tiles_kernel",
                                                                                   "_expand_tiles_kernel")
    for launched in per_batch.values():
        assert launched == {shrink: 4 * layers_, expand: 7 * layers_}
