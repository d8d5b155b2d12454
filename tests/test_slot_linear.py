import pytest
import torch
from torch import nn

from loramux.server.lora.slot_bank import SlotBank
from loramux.server.lora.slot_linear import LoraRouting, RoutingPlan, SlotLinear


def make_layer(slots=3, rank=4, seed=0):
    torch.manual_seed(seed)
    routing = LoraRouting()
    layer = SlotLinear(nn.Linear(6, 5, bias=True), num_slots=slots, routing=routing)
    return layer, routing


def plan(slots):
    groups = {}
    for row, slot in enumerate(slots):
        if slot != 3:
            groups.setdefault(slot, []).append(row)
    return RoutingPlan(list(slots), [(s, torch.tensor(r)) for s, r in groups.items()], torch.device("cpu"))


def test_rows_without_adapter_get_exactly_the_base_output():
    layer, routing = make_layer()
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 2.0)
    x = torch.randn(3, 2, 6)
    routing.plan = plan([3, 0, 3])  # slot 3 = the zero slot
    out = layer(x)
    base = layer.base_layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])


def test_all_base_rows_skip_lora():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(6, 5))
    bank = SlotBank(model, ("q_proj",), num_slots=3, max_rank=4)
    from loramux.server.lora.weights import AdapterWeights, ModuleLora

    assert bank.plan([None, None], torch.device("cpu")) is None  # no row has an adapter
    for uid in (11, 12):
        bank.place(uid, AdapterWeights({"q_proj": ModuleLora(torch.randn(2, 6), torch.randn(5, 2), 1.0)}))
    assert bank.slot_table() == (11, 12, None) and bank.counted_bytes() == bank.resident_bytes() == 2 * (12 + 10) * 4
    two = bank.plan([11, None, 12, 11], torch.device("cpu"))  # rows name adapters by uid; slots stay inside
    assert [(s, rows.tolist()) for s, rows in two.groups] == [(0, [0, 3]), (1, [2])] and two.slots == [0, 3, 1, 0]
    bank.drop(11)
    assert bank.slot_table() == (None, 12, None) and bank.counted_bytes() == bank.resident_bytes() == (12 + 10) * 4
    bank.route(None)
    x = torch.randn(2, 1, 6)
    layer = bank.layers["q_proj"]
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("seq", [1, 4])  # decode (concatenated adapters) and prefill (a loop over adapters)
def test_mixed_rows_match_per_adapter_lora_at_true_rank(seq):
    layer, routing = make_layer(rank=4)
    a0, b0 = torch.randn(4, 6), torch.randn(5, 4)
    a1, b1 = torch.randn(2, 6), torch.randn(5, 2)  # rank 2 in a rank-4 slot: computed at rank 2
    layer.fill(0, a0, b0, 0.5)
    layer.fill(1, a1, b1, 3.0)
    x = torch.randn(4, seq, 6)
    routing.plan = plan([1, 0, 3, 1])
    out = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(out[0], base[0] + (x[0] @ a1.T @ b1.T) * 3.0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], base[1] + (x[1] @ a0.T @ b0.T) * 0.5, rtol=0, atol=1e-5)
    assert torch.equal(out[2], base[2])
    torch.testing.assert_close(out[3], base[3] + (x[3] @ a1.T @ b1.T) * 3.0, rtol=0, atol=1e-5)
    if seq == 1:
        view = layer.buffer_layout().view
        assert view.used == 4 + 2 and layer.buffer_layout().segments == {1: (0, 2, 1), 0: (2, 4, 1)}  # true ranks, no padding
        # Adapters side by side in the order rows first use them: slot 1 (rank 2), then slot 0 (rank 4).
        assert (~view.hide)[:, 0].tolist() == [[1] * 2 + [0] * 4, [0] * 2 + [1] * 4, [0] * 6, [1] * 2 + [0] * 4]


def test_a_layer_no_adapter_in_the_batch_targets_is_skipped():
    layer, routing = make_layer(rank=4)
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 0.5)
    layer.clear(1)  # slot 1's adapter does not target this layer
    routing.plan = plan([1, 1])
    x = torch.randn(2, 1, 6)
    assert torch.equal(layer(x), layer.base_layer(x)) and layer.buffer_layout().view is None and layer.buffer_layout().columns == 0


def test_a_slot_holds_its_adapter_at_true_rank_and_refilling_leaves_no_old_weights():
    layer, _ = make_layer(rank=4)
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 1.0)
    assert layer.resident_bytes() == (4 * 6 + 4 * 5) * 4
    a, b = torch.randn(1, 6), torch.randn(5, 1)
    layer.fill(0, a, b, 2.0)
    assert layer.a_t[0].shape == (6, 1) and layer.b_t[0].shape == (1, 5)  # rank 1, nothing padded
    assert layer.resident_bytes() == (6 + 5) * 4
    ra, rb, _ = layer.read(0, 1)
    assert torch.equal(ra, a) and torch.equal(rb, b) and layer.scales[0] == 2.0 and layer.ranks[0] == 1
    layer.clear(0)
    assert layer.a_t == {} and layer.b_t == {} and layer.scales[0] == 0 and layer.resident_bytes() == 0


def test_joins_copy_only_the_adapters_that_join_and_columns_read_for_nothing_are_rebuilt_away():
    layer, routing = make_layer(slots=3, rank=4)
    w = {s: (torch.randn(4, 6), torch.randn(5, 4)) for s in range(3)}
    for s, (a, b) in w.items():
        layer.fill(s, a, b, 1.0 + s)
    x = torch.randn(3, 1, 6)

    def check(slots):
        routing.plan = plan(slots)
        out = layer(x[: len(slots)])
        for i, s in enumerate(slots):
            a, b = w[s]
            expected = layer.base_layer(x[i]) + (x[i] @ a.T @ b.T) * (1.0 + s) if s != 3 else layer.base_layer(x[i])
            torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-5)

    check([0, 1])
    assert layer.buffer_layout().segments == {0: (0, 4, 1), 1: (4, 4, 1)} and layer.buffer_layout().wasted == 0
    check([0, 1])  # the same plan object is reused: nothing copied
    first = layer.buffer_layout().view
    layer(x[:2])
    assert layer.buffer_layout().view is first
    check([1, 2])  # slot 2 joins: appended; slot 0 stays, masked out: a step reads its 4 columns for nothing
    assert layer.buffer_layout().segments == {0: (0, 4, 1), 1: (4, 4, 1), 2: (8, 4, 1)} and layer.buffer_layout().columns == 12 and layer.buffer_layout().wasted == 4
    check([1, 2])  # 8 columns wasted in all = the 8 live ones a rebuild copies: rebuilt from the batch's adapters
    assert layer.buffer_layout().segments == {1: (0, 4, 1), 2: (4, 4, 1)} and layer.buffer_layout().columns == 8 and layer.buffer_layout().wasted == 0
    check([2])  # the rows of 1 left: 4 wasted >= 4 live, rebuilt at once
    assert layer.buffer_layout().segments == {2: (0, 4, 1)} and layer.buffer_layout().columns == 4
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    w[0] = (a, b)
    layer.fill(0, a, b, 1.0)  # slot 0 refilled at rank 2: appended when a batch uses it
    check([0, 2])
    assert layer.buffer_layout().segments == {2: (0, 4, 1), 0: (4, 2, 2)} and layer.buffer_layout().columns == 6 and layer.buffer_layout().wasted == 0
    w[2] = (torch.randn(4, 6), torch.randn(5, 4))
    layer.fill(2, *w[2], 3.0)  # slot 2 refilled: its old columns are dead, 6 > the 4 live: rebuilt at placement
    check([2])
    assert layer.buffer_layout().segments == {2: (0, 4, 2)} and layer.buffer_layout().columns == 4


@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])  # --lora-dtype serving, and float32
def test_bf16_keeps_the_scale_and_the_sum_in_float32(lora_dtype):
    """peft on a bfloat16 base: `(result + lora_B(lora_A(x)) * scaling).to(bfloat16)`, a Python
    float scale and a float32 sum rounded once (its adapters upcast to float32 by default)."""
    torch.manual_seed(0)
    routing = LoraRouting()
    layer = SlotLinear(nn.Linear(6, 5, bias=False).to(torch.bfloat16), num_slots=3, routing=routing, dtype=lora_dtype)
    a, b = torch.randn(4, 6, dtype=lora_dtype), torch.randn(5, 4, dtype=lora_dtype)
    scale = 1.0 / 3.0  # not representable in bfloat16
    layer.fill(0, a, b, scale)
    x = torch.randn(1, 1, 6, dtype=torch.bfloat16)
    base = layer.base_layer(x)
    h = x.to(lora_dtype) @ a.T
    expected = (base + (h @ b.T).float() * scale).to(torch.bfloat16)  # peft's order, decode and prefill alike
    for tokens in (1, 3):
        routing.plan = plan([0])
        xs = x.expand(1, tokens, 6).contiguous()
        assert torch.equal(layer(xs), expected.expand(1, tokens, 5)), tokens


@pytest.mark.parametrize("compiled", [False, True])  # the eager decode step, and the arithmetic of the compiled one
def test_an_adapter_that_overflows_poisons_only_its_own_rows_even_as_dead_columns(compiled):
    """Huge-but-finite weights (valid in the serving dtype) can overflow x @ A. The other rows'
    masks must not turn that inf into NaN for them (inf * 0 is NaN): neither while the adapter
    has rows in the batch, nor after they left and its columns sit dead in the decode buffer."""
    layer, routing = make_layer(slots=3, rank=4)
    a0, b0 = torch.randn(4, 6), torch.randn(5, 4)
    layer.fill(0, a0, b0, 0.5)
    layer.fill(1, torch.full((2, 6), 3e38), torch.zeros(5, 2), 1.0)  # finite float32, B = 0 (peft's initial B)
    x = torch.rand(3, 1, 6) + 0.5  # every x @ A of slot 1 overflows

    def step(slots):
        routing.plan = plan(slots)
        if not compiled:
            return layer(x[: len(slots)])
        layer.static_inputs(routing.plan, len(slots))
        routing.compiled = True
        try:
            return layer(x[: len(slots)])
        finally:
            routing.compiled = False

    def good(i):
        return layer.base_layer(x[i]) + (x[i] @ a0.T @ b0.T) * 0.5

    out = step([0, 1, 3])
    torch.testing.assert_close(out[0], good(0), rtol=0, atol=1e-5)
    assert not torch.isfinite(out[1]).any()  # its own row: inf * 0 = NaN, as peft computes it
    assert torch.equal(out[2], layer.base_layer(x[2]))
    out = step([0, 3])  # slot 1's rows left: its columns are dead but still in the buffer
    assert layer.buffer_layout().segments[1][1] == 2 and layer.buffer_layout().columns == 6
    torch.testing.assert_close(out[0], good(0), rtol=0, atol=1e-5)
    assert torch.equal(out[1], layer.base_layer(x[1]))


def test_a_layer_fed_tokens_it_cannot_assign_to_rows_refuses_instead_of_mixing_adapters():
    """Rows come as [rows, tokens, in], or flattened row by row (OPT's MLP): both are served.
    A layer fed some other set of tokens (experts fed the tokens routed to them) cannot tell
    whose tokens they are: an error for the batch, never another row's adapter."""
    layer, routing = make_layer(rank=4)
    a0, b0 = torch.randn(4, 6), torch.randn(5, 4)
    layer.fill(0, a0, b0, 0.5)
    routing.plan, routing.tokens = plan([0, 3]), 3
    x = torch.randn(2, 3, 6)
    want = layer(x)
    torch.testing.assert_close(want[0], layer.base_layer(x[0]) + (x[0] @ a0.T @ b0.T) * 0.5, rtol=0, atol=1e-5)
    assert torch.equal(want[1], layer.base_layer(x[1]))
    assert torch.equal(layer(x.reshape(6, 6)), want.reshape(6, 5))  # flattened row by row: the same outputs
    for odd in (x.reshape(6, 6)[:4], x[:, :2], torch.randn(3, 3, 6), x.reshape(6, 6)[:2]):
        with pytest.raises(RuntimeError, match="cannot be told apart by row"):
            layer(odd)
