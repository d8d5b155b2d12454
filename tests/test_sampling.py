"""The batched sampler against transformers' own logits processors, row by row, in mixed batches."""

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from loramux.server.engine.request import SamplingParams
from loramux.server.engine.sampling import BatchParams, apply_repetition_penalty, choose_tokens, distribution, new_generator

V = 64
CPU = torch.device("cpu")
ROWS = [
    SamplingParams(8),  # greedy
    SamplingParams(8, repetition_penalty=1.3),  # greedy with a penalty
    SamplingParams(8, temperature=0.7, seed=1),
    SamplingParams(8, temperature=1.0, top_k=5, seed=2),
    SamplingParams(8, temperature=1.3, top_p=0.8, seed=3),
    SamplingParams(8, temperature=0.9, top_k=10, top_p=0.6, repetition_penalty=0.8, seed=4),
    SamplingParams(8, temperature=2.0, top_k=1, seed=5),
    SamplingParams(8, temperature=0.5, top_p=0.05, repetition_penalty=2.0, seed=6),
]


def hf_scores(logits_row, seen_ids, p: SamplingParams):
    scores = logits_row[None].clone()
    ids = torch.tensor([seen_ids])
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.greedy:
        return scores[0]
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores[0]


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(ROWS), V, generator=g) * 3
    logits[:, 7] = logits[:, 3]  # a tie, to check top-k keeps ties as transformers does
    seen_ids = [torch.randint(0, V, (5,), generator=g).tolist() for _ in ROWS]
    seen = torch.zeros(len(ROWS), V, dtype=torch.bool)
    for i, ids in enumerate(seen_ids):
        seen[i, ids] = True
    return logits, seen_ids, seen


@pytest.mark.parametrize("seed", range(5))
def test_distributions_and_greedy_tokens_equal_transformers(seed):
    logits, seen_ids, seen = make(seed)
    batch = BatchParams(ROWS, [new_generator(p) for p in ROWS], CPU)
    penalised = apply_repetition_penalty(logits, seen, batch.penalty)
    ours = distribution(penalised.index_select(0, batch.sampled_index), batch)
    for j, i in enumerate(batch.sampled):
        expected = hf_scores(logits[i], seen_ids[i], ROWS[i]).softmax(-1)
        assert torch.allclose(ours[j], expected, atol=1e-6), i
        assert torch.equal(ours[j] > 0, expected > 0), i  # the same tokens are possible
    tokens, _, bad, _ = choose_tokens(logits, batch, seen)
    assert not bad.any()
    for i in batch.greedy:
        assert tokens[i] == hf_scores(logits[i], seen_ids[i], ROWS[i]).argmax(), i
    for i in batch.sampled:
        assert hf_scores(logits[i], seen_ids[i], ROWS[i])[tokens[i]] > float("-inf")


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch():
    logits, _, seen = make(1)
    alone = ROWS[3]
    def run(params, rows_logits, rows_seen):
        batch = BatchParams(params, [new_generator(p) for p in params], CPU)
        out = []
        for _ in range(20):
            tokens, _, _, _ = choose_tokens(rows_logits, batch, rows_seen)
            out.append(tokens[params.index(alone)].item())
        return out

    assert run([alone], logits[3:4], seen[3:4]) == run(ROWS, logits, seen)


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = SamplingParams(1, temperature=1.0, seed=11)
    batch = BatchParams([p], [new_generator(p)], CPU)
    counts = torch.zeros(5)
    for _ in range(6000):
        counts[choose_tokens(logits, batch, None)[0][0]] += 1
    expected = logits[0].softmax(-1) * 6000
    assert counts[4] == 0
    assert torch.all((counts[:4] - expected[:4]).abs() < 4 * expected[:4].sqrt() + 5), (counts, expected)


def test_non_finite_rows_are_reported_and_the_others_sampled():
    logits, _, seen = make(2)
    logits[2, 5] = float("nan")
    logits[4] = float("-inf")
    batch = BatchParams(ROWS, [new_generator(p) for p in ROWS], CPU)
    tokens, logprobs, bad, _ = choose_tokens(logits, batch, seen)
    assert bad.nonzero()[:, 0].tolist() == [2, 4] and logprobs is None
    assert tokens[0] == logits[0].argmax()


# -- OpenAI's and vLLM's controls, each against its formula, rows of a mixed batch ----------------

CONTROLS = [
    SamplingParams(8),  # nothing: untouched
    SamplingParams(8, presence_penalty=0.7),
    SamplingParams(8, frequency_penalty=-0.4),
    SamplingParams(8, presence_penalty=1.5, frequency_penalty=2.0, temperature=0.8, seed=3),
    SamplingParams(8, logit_bias=((5, 100.0), (9, -100.0), (11, 2.5))),
    SamplingParams(8, min_tokens=3),  # stop ids {1, 2}: masked until 3 tokens
    SamplingParams(8, min_tokens=2, temperature=1.0, min_p=0.2, seed=4),  # already at 2: free again
]


def controls_batch():
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(len(CONTROLS), V, generator=g) * 3
    counts = torch.zeros(len(CONTROLS), V)
    for i in range(len(CONTROLS)):
        ids = torch.randint(0, V, (6,), generator=g)
        counts[i].scatter_add_(0, ids, torch.ones(6))
    generated = torch.tensor([0, 0, 0, 0, 0, 1, 2])
    batch = BatchParams(CONTROLS, [new_generator(p) for p in CONTROLS], CPU,
                        [frozenset({1, 2})] * len(CONTROLS))
    return logits, counts, generated, batch


def test_each_control_changes_only_its_rows_as_its_formula_says():
    from loramux.server.engine.sampling import adjust

    logits, counts, generated, batch = controls_batch()
    scores = adjust(logits, batch, None, counts, generated)
    expected = logits.clone()
    for i, p in enumerate(CONTROLS):
        expected[i] -= p.frequency_penalty * counts[i] + p.presence_penalty * (counts[i] > 0).float()
        for token, bias in p.logit_bias:
            expected[i, token] += bias
        if generated[i] < p.min_tokens:
            expected[i, [1, 2]] = float("-inf")
    assert torch.equal(scores, expected)
    tokens, _, _, _ = choose_tokens(logits, batch, None, counts, generated)
    assert tokens[4] == 5  # +100 wins greedily
    assert tokens[5] not in (1, 2)


def test_min_p_drops_what_is_less_likely_than_min_p_times_the_top_token():
    _, _, _, batch = controls_batch()
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(len(batch.sampled), V, generator=g) * 2
    probs = distribution(scores, batch)
    reference = (scores / batch.temperature).softmax(-1)
    row = batch.sampled.index(6)  # the min_p row among the sampled ones
    keep = reference[row] >= 0.2 * reference[row].max()
    assert torch.equal(probs[row] > 0, keep) and torch.allclose(probs[row][keep], reference[row][keep])
    other = batch.sampled.index(3)
    assert torch.allclose(probs[other], reference[other])


def test_top_logprobs_are_the_models_own_most_likely_tokens():
    logits, counts, generated, _ = controls_batch()
    params = [SamplingParams(8, top_logprobs=k, logit_bias=((0, 50.0),)) for k in (3, 0, 5)]
    batch = BatchParams(params, [None] * 3, CPU, [frozenset()] * 3)
    tokens, logprobs, _, top = choose_tokens(logits[:3], batch, None)
    raw = torch.log_softmax(logits[:3], -1)
    values, ids = top
    assert ids.shape == (3, 5) and torch.equal(values, raw.topk(5, -1).values) and torch.equal(ids, raw.topk(5, -1).indices)
    assert tokens.tolist() == [0, 0, 0]  # chosen from the biased scores; logprobs are the model's own
    assert torch.equal(logprobs, raw[:, 0])


def test_choosing_tokens_never_waits_for_the_device():
    """Greedy and sampled rows, penalties, top-k/top-p/min-p, logprobs and alternatives, a row
    with non-finite scores: no operator reads a value back or makes a data-dependent shape
    (on a GPU each would stall the step's queue); the caller reads the step back once."""
    from host_syncs import HostSyncs

    logits, _, seen = make(3)
    logits[1] = float("nan")
    params = [dataclasses.replace(p, top_logprobs=3, return_logprobs=True) for p in ROWS]
    params[0] = dataclasses.replace(params[0], presence_penalty=0.5, frequency_penalty=0.3, min_p=0.05)
    batch = BatchParams(params, [new_generator(p) for p in params], CPU)
    counts = torch.zeros_like(logits)
    with HostSyncs() as watch:
        tokens, logprobs, bad, top = choose_tokens(logits, batch, seen, counts)
    assert watch.seen == []
    assert bad.tolist() == [i == 1 for i in range(len(params))]
    assert batch.sampled and batch.greedy and logprobs is not None and top is not None
    with HostSyncs() as watch:  # (the watch sees what it is meant to)
        bool(bad.any())
    assert watch.seen


def test_a_sampled_step_queues_the_same_device_operators_whatever_its_number_of_sampled_rows():
    """Each sampled row's random number is drawn on the host from its own generator, and the
    step's draws reach the device in one copy: on the model's device (here `meta`, which runs
    no arithmetic), 2 and 8 sampled rows queue the same operators (on a GPU, one per row would
    be a launch per row per step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ByDevice(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, list[str]] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for device in {t.device.type for t in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(t, torch.Tensor)}:
                self.ops.setdefault(device, []).append(func.__name__)
            return out

    meta = torch.device("meta")
    seen = {}
    for m in (2, 8):
        params = [SamplingParams(8, temperature=0.8, top_p=0.9, seed=i) for i in range(m)]
        gens = [new_generator(p) for p in params]
        assert all(g.device.type == "cpu" for g in gens)
        batch = BatchParams(params, gens, meta)
        with ByDevice() as watch:
            choose_tokens(torch.empty(m, V, device=meta), batch, None)
        seen[m] = watch.ops
        assert watch.ops["cpu"] == ["rand.generator"] * m + ["stack.default"]
    assert seen[2]["meta"] == seen[8]["meta"]
    assert seen[2]["meta"].count("_to_copy.default") == 1  # the draws, in one copy
