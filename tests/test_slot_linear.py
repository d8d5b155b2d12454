import torch
from torch import nn

from loramux.server.lora.slot_bank import SlotBank
from loramux.server.lora.slot_linear import LoraRouting, SlotLinear


def make_layer(slots=3, rank=4, seed=0):
    torch.manual_seed(seed)
    routing = LoraRouting()
    layer = SlotLinear(nn.Linear(6, 5, bias=True), num_slots=slots, max_rank=rank, routing=routing)
    return layer, routing


def test_rows_without_adapter_get_exactly_the_base_output():
    layer, routing = make_layer()
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 2.0)
    x = torch.randn(3, 2, 6)
    routing.slot_index = torch.tensor([3, 0, 3])  # slot 3 = the zero slot
    out = layer(x)
    base = layer.base_layer(x)
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert not torch.allclose(out[1], base[1])


def test_all_base_rows_skip_lora():
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(6, 5))
    bank = SlotBank(model, ("q_proj",), num_slots=3, max_rank=4)
    assert bank.routing_index([3, 3], torch.device("cpu")) is None  # no row has an adapter
    assert torch.equal(bank.routing_index([3, 0], torch.device("cpu")), torch.tensor([3, 0]))
    bank.route(None)
    x = torch.randn(2, 1, 6)
    layer = bank.layers["q_proj"]
    assert torch.equal(layer(x), layer.base_layer(x))


def test_mixed_rows_match_per_adapter_lora_with_rank_padding():
    layer, routing = make_layer(rank=4)
    a0, b0 = torch.randn(4, 6), torch.randn(5, 4)
    a1, b1 = torch.randn(2, 6), torch.randn(5, 2)  # rank 2, padded to 4
    layer.fill(0, a0, b0, 0.5)
    layer.fill(1, a1, b1, 3.0)
    x = torch.randn(3, 4, 6)
    routing.slot_index = torch.tensor([1, 0, 1])
    out = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(out[0], base[0] + (x[0] @ a1.T @ b1.T) * 3.0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], base[1] + (x[1] @ a0.T @ b0.T) * 0.5, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2], base[2] + (x[2] @ a1.T @ b1.T) * 3.0, rtol=0, atol=1e-5)


def test_refilling_a_slot_with_lower_rank_leaves_no_old_weights():
    layer, _ = make_layer(rank=4)
    layer.fill(0, torch.randn(4, 6), torch.randn(5, 4), 1.0)
    a, b = torch.randn(1, 6), torch.randn(5, 1)
    layer.fill(0, a, b, 2.0)
    assert torch.equal(layer.lora_A_t[0, :, 1:], torch.zeros(6, 3))  # A^T [in, R]: ranks 1..3 zeroed
    assert torch.equal(layer.lora_B_t[0, 1:], torch.zeros(3, 5))  # B^T [R, out]
    ra, rb = layer.read(0, 1)
    assert torch.equal(ra, a) and torch.equal(rb, b) and layer.scale[0].item() == 2.0
    layer.clear(0)
    assert layer.lora_A_t[0].abs().sum() == 0 and layer.lora_B_t[0].abs().sum() == 0 and layer.scale[0] == 0


def test_gathered_weights_are_reused_only_while_routing_and_slots_stay_the_same():
    layer, routing = make_layer(rank=4)
    routing.cache_rows = 2
    a0, b0, a1, b1 = torch.randn(4, 6), torch.randn(5, 4), torch.randn(4, 6), torch.randn(5, 4)
    layer.fill(0, a0, b0, 1.0)
    layer.fill(1, a1, b1, 1.0)
    x = torch.randn(2, 1, 6)
    index = torch.tensor([0, 1])
    routing.slot_index = index
    first = layer(x)
    gathered = layer._gathered
    assert gathered is not None and gathered[0] is index
    assert torch.equal(layer(x), first) and layer._gathered is gathered  # reused, not gathered again
    buffer = layer._buffer_a.data_ptr()
    layer.fill(1, a0, b0, 1.0)  # a slot refilled: the gathered copy is stale
    refilled = layer(x)
    assert layer._buffer_a.data_ptr() == buffer  # gathered again into the same storage
    torch.testing.assert_close(refilled[1], layer.base_layer(x[1]) + x[1] @ a0.T @ b0.T, rtol=0, atol=1e-5)
    routing.slot_index = torch.tensor([0, 1, 0])  # more rows than cache_rows: gathered per call
    layer(torch.randn(3, 1, 6))
    assert layer._gathered is None
