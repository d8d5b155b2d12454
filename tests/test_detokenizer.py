"""Incremental detokenization equals decoding the whole output, chunk by chunk, with stop strings."""

import random

import pytest



def chunks(detok, ids):
    out = [detok.add(t) for t in ids]
    out.append(detok.flush())
    return out


@pytest.mark.parametrize("seed", range(20))
def test_chunks_add_up_to_the_full_decode(assets, seed):
    from loramux.server.engine.detokenizer import Detokenizer

    rng = random.Random(seed)
    tok = assets.tokenizer
    # Ids of text with multi-byte characters, and random ids (which split characters between tokens).
    ids = tok("naïve café — 東京 🙂 " * 3, add_special_tokens=False)["input_ids"] if seed % 2 else \
        [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
    pieces = chunks(Detokenizer(tok, ()), ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    if seed % 2:  # valid text split into tokens: a half character is never handed out
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("seed", range(10))
def test_stop_strings_cut_as_the_full_text_would(assets, seed):
    from loramux.server.engine.detokenizer import Detokenizer

    rng = random.Random(seed)
    tok = assets.tokenizer
    ids = tok("the quick brown fox jumps over the lazy dog number 42, said Ada. " * 2, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    start = rng.randrange(5, len(full) - 10)
    stop = full[start : start + rng.randint(1, 6)]
    detok = Detokenizer(tok, ("zzz-not-there", stop))
    pieces = []
    for t in ids:
        pieces.append(detok.add(t))
        if detok.stopped:
            break
    pieces.append(detok.flush())
    assert detok.stopped and "".join(pieces) == full[: full.index(stop)]
    # Held back while it could still become the stop string: no piece handed out ever passes the cut.
    assert all(stop not in "".join(pieces[: i + 1]) for i in range(len(pieces)))
