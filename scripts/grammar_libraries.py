"""Measure the structured-output libraries side by side, to choose one (issue 23).

For xgrammar, llguidance and outlines-core, on one byte-level BPE vocabulary trained here
(default 32,000 tokens over this Python's standard library sources):

- building the per-tokenizer state (once per server);
- compiling each kind of constraint the server offers: `json_object`, a small and a nested
  JSON schema, a regex, a context-free grammar;
- the per-token mask: walking a valid answer's tokens, the time to fill one row's bitmask
  (mean and p99), and whether every token of the valid answer was allowed;
- hostile inputs, each compiled in a child process with a time limit: a recursive `$ref`, a
  schema nested 300 deep, an enum of 20,000 strings, regexes whose automaton explodes, a
  grammar of 50,000 rules. The child's outcome: compiled (and how long), refused (with the
  library's message), killed at the limit, or crashed.

Run: `.venv/bin/python scripts/grammar_libraries.py [--vocab 32000] [--limit-s 20]`.
The libraries are installed by `pip install xgrammar llguidance outlines-core` (only the
chosen one is a loramux dependency). Results are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

SMALL_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "admin"],
    "additionalProperties": False,
}
SMALL_ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "admin": False}

NESTED_SCHEMA = {
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False,
        },
        "item": {
            "type": "object",
            "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                           "price": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["sku", "qty", "price", "tags"], "additionalProperties": False,
        },
    },
    "properties": {
        "order_id": {"type": "string"},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "ship_to": {"$ref": "#/$defs/address"},
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["order_id", "status", "ship_to", "items", "note"],
    "additionalProperties": False,
}
NESTED_ANSWER = {
    "order_id": "A-1029", "status": "shipped",
    "ship_to": {"street": "12 Analytical Row", "city": "London", "zip": "01234"},
    "items": [{"sku": "ENG-1", "qty": 2, "price": 19.5, "tags": ["gear", "brass"]},
              {"sku": "CARD-7", "qty": 100, "price": 0.25, "tags": []}],
    "note": None,
}
REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"
REGEX_ANSWER = "2026-12-05T01:49:58Z"
# Arithmetic over integers: a context-free language (balanced parentheses), in each library's syntax.
LARK = """
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
GBNF = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
CFG_ANSWER = "(12+7)*3-(4/(2+2))"


def hostile_cases() -> dict[str, tuple[str, object]]:
    deep: dict = {"type": "string"}
    for _ in range(300):
        deep = {"type": "object", "properties": {"a": deep}, "required": ["a"]}
    many_rules = "start: r0\n" + "".join(f"r{i}: \"x{i}\" | r{i + 1}\n" for i in range(50_000)) + "r50000: \"end\"\n"
    return {
        "recursive $ref": ("schema", {"$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["value", "children"]}}, "$ref": "#/$defs/node"}),
        "self-only $ref": ("schema", {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
        "nested 300 deep": ("schema", deep),
        "enum of 20,000": ("schema", {"enum": [f"value-{i:05d}-{'x' * (i % 13)}" for i in range(20_000)]}),
        "regex (a|aa)*b over 1k": ("regex", "(a|aa){0,1000}b"),
        "regex .{0,3000}x.{0,3000}": ("regex", ".{0,3000}x.{0,3000}"),
        "regex counted 100^3": ("regex", "((([a-z]{1,100}){1,100}){1,100})"),
        "grammar 50k rules": ("lark", many_rules),
    }


# -- the libraries, behind one small interface -------------------------------------------------

class Lib:
    name = ""

    def __init__(self, tokenizer, vocab: int):
        self.tokenizer, self.vocab = tokenizer, vocab

    def compile(self, kind: str, spec):  # -> a compiled object
        raise NotImplementedError

    def matcher(self, compiled):
        raise NotImplementedError

    def fill(self, m, bitmask) -> None:
        raise NotImplementedError

    def accept(self, m, token: int) -> bool:
        raise NotImplementedError


class XGrammar(Lib):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import xgrammar as xgr
        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)

    def compile(self, kind, spec):
        c = self.compiler
        if kind == "json_object":
            return c.compile_builtin_json_grammar()
        if kind == "schema":
            return c.compile_json_schema(json.dumps(spec), strict_mode=True)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "lark":
            return c.compile_lark(spec) if hasattr(c, "compile_lark") else c.compile_grammar(spec)
        if kind == "gbnf":
            return c.compile_grammar(spec)
        raise ValueError(kind)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self):
        return self.xgr.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, bitmask):
        m.fill_next_token_bitmask(bitmask, 0)

    def accept(self, m, token):
        return m.accept_token(token)


class LLGuidance(Lib):
    name = "llguidance"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, kind, spec):
        M = self.ll.LLMatcher
        if kind == "json_object":
            grammar = M.grammar_from_json_schema({"type": "object"})
        elif kind == "schema":
            grammar = M.grammar_from_json_schema(spec)
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "lark":
            grammar = M.grammar_from_lark(spec)
        elif kind == "gbnf":
            from llguidance.gbnf_to_lark import gbnf_to_lark
            grammar = M.grammar_from_lark(gbnf_to_lark(spec))
        else:
            raise ValueError(kind)
        m = M(self.tok, grammar, log_level=0)  # builds the lexer: the compile
        if m.is_error():
            raise ValueError(m.get_error())
        return grammar, m

    def matcher(self, compiled):
        grammar, pristine = compiled
        return pristine.deep_copy()  # a request's own state, the lexer shared

    def bitmask(self):
        return self.ll.torch.allocate_token_bitmask(1, self.vocab)

    def fill(self, m, bitmask):
        self.ll.torch.fill_next_token_bitmask(m, bitmask, 0)

    def accept(self, m, token):
        return m.consume_token(token)


class OutlinesCore(Lib):
    name = "outlines-core"

    def __init__(self, tokenizer, vocab):
        super().__init__(tokenizer, vocab)
        import torch
        from outlines_core import Vocabulary
        self.torch = torch
        byte_decoder = _byte_level_decoder()
        tokens: dict[bytes, list[int]] = {}
        for text, i in tokenizer.get_vocab().items():
            if i == tokenizer.eos_token_id or text in tokenizer.all_special_tokens:
                continue
            raw = bytes(byte_decoder[c] for c in text) if all(c in byte_decoder for c in text) else text.encode()
            tokens.setdefault(raw, []).append(i)
        self.vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)

    def compile(self, kind, spec):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema
        if kind == "json_object":
            raise NotImplementedError("no free-form JSON (a schema or regex only)")
        if kind in ("lark", "gbnf"):
            raise NotImplementedError("no context-free grammars (regular languages only)")
        regex = build_regex_from_schema(json.dumps(spec)) if kind == "schema" else spec
        return Index(regex, self.vocabulary)

    def matcher(self, compiled):
        from outlines_core import Guide
        return Guide(compiled)

    def bitmask(self):
        return self.torch.zeros((1, (self.vocab + 31) // 32), dtype=self.torch.int32)

    def fill(self, m, bitmask):
        m.write_mask_into(bitmask.data_ptr(), bitmask.numel(), bitmask.element_size())

    def accept(self, m, token):
        try:
            m.advance(token)
            return True
        except Exception:  # noqa: BLE001 - a refused token
            return False


LIBS = {cls.name: cls for cls in (XGrammar, LLGuidance, OutlinesCore)}


def _byte_level_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


# -- the measurement ------------------------------------------------------------------------------

def build_tokenizer(vocab: int, out: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
    from loramux.bench.assets import code_tokenizer

    return code_tokenizer(out, vocab)


def walk(lib: Lib, compiled, answer: str) -> tuple[list[float], bool]:
    """Fill the mask before each of the answer's tokens; returns the fill times and whether every
    token was allowed by its mask and accepted."""
    ids = lib.tokenizer(answer, add_special_tokens=False)["input_ids"]
    m = lib.matcher(compiled)
    bitmask = lib.bitmask()
    times, ok = [], True
    for token in ids:
        started = time.perf_counter()
        lib.fill(m, bitmask)
        times.append(time.perf_counter() - started)
        word = int(bitmask[0, token // 32])
        if not (word >> (token % 32)) & 1 or not lib.accept(m, token):
            ok = False
            break
    return times, ok


def _compile_child(name: str, vocab: int, tok_dir: str, case: str, out) -> None:
    from transformers import AutoTokenizer
    kind, spec = hostile_cases()[case]  # built here: a 300-deep schema does not pickle
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    lib = LIBS[name](tokenizer, vocab)
    out.put(("loaded", 0.0, ""))
    started = time.perf_counter()
    try:
        lib.compile(kind, spec)
        out.put(("compiled", time.perf_counter() - started, ""))
    except NotImplementedError as e:
        out.put(("unsupported", time.perf_counter() - started, str(e)))
    except Exception as e:  # noqa: BLE001 - the library's refusal, reported
        out.put(("refused", time.perf_counter() - started, f"{type(e).__name__}: {str(e)[:160]}"))


def hostile(name: str, vocab: int, tok_dir: str, limit_s: float) -> dict[str, str]:
    results = {}
    ctx = mp.get_context("spawn")
    for case in hostile_cases():
        out = ctx.Queue()
        child = ctx.Process(target=_compile_child, args=(name, vocab, tok_dir, case, out))
        child.start()
        loaded = out.get(timeout=120)  # the tokenizer and library are loaded: the clock starts
        assert loaded[0] == "loaded"
        try:
            outcome, seconds, message = out.get(timeout=limit_s)
        except Exception:  # noqa: BLE001 - queue.Empty: still compiling, or died without a word
            outcome = None
        child.join(5)
        if outcome is None and child.is_alive():
            child.kill()
            child.join()
            results[case] = f"killed at {limit_s:.0f} s"
        elif outcome is None:
            results[case] = f"crashed (exit {child.exitcode})"
        else:
            results[case] = f"{outcome} in {seconds * 1000:.0f} ms" + (f" ({message})" if message else "")
    return results


def measure(name: str, tokenizer, vocab: int) -> dict:
    started = time.perf_counter()
    lib = LIBS[name](tokenizer, vocab)
    setup = time.perf_counter() - started
    row = {"setup_ms": setup * 1000, "compile_ms": {}, "mask_us": {}, "valid": {}}
    cases = {
        "json_object": ("json_object", None, json.dumps(NESTED_ANSWER)),
        "small schema": ("schema", SMALL_SCHEMA, json.dumps(SMALL_ANSWER)),
        "nested schema": ("schema", NESTED_SCHEMA, json.dumps(NESTED_ANSWER)),
        "regex": ("regex", REGEX, REGEX_ANSWER),
        "grammar": ("gbnf" if name == "xgrammar" else "lark", GBNF if name == "xgrammar" else LARK, CFG_ANSWER),
    }
    for case, (kind, spec, answer) in cases.items():
        try:
            started = time.perf_counter()
            compiled = lib.compile(kind, spec)
            row["compile_ms"][case] = (time.perf_counter() - started) * 1000
        except NotImplementedError as e:
            row["compile_ms"][case] = f"unsupported: {e}"
            continue
        times, ok = [], True
        for _ in range(5):  # five walks, for a stable mean and p99
            t, good = walk(lib, compiled, answer)
            times += t
            ok = ok and good
        times.sort()
        row["mask_us"][case] = (statistics.mean(times) * 1e6, times[int(0.99 * (len(times) - 1))] * 1e6)
        row["valid"][case] = ok
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--limit-s", type=float, default=20.0)
    parser.add_argument("--libs", default="xgrammar,llguidance,outlines-core")
    parser.add_argument("--no-hostile", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        tokenizer = build_tokenizer(args.vocab, Path(tmp))
        vocab = len(tokenizer)
        print(f"tokenizer: byte-level BPE, {vocab} tokens, trained in {time.perf_counter() - started:.0f} s\n")
        rows = {name: measure(name, tokenizer, vocab) for name in args.libs.split(",")}
        cases = list(next(iter(rows.values()))["compile_ms"])
        print("| | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
        print("| tokenizer state (once) | " + " | ".join(f"{r['setup_ms']:.0f} ms" for r in rows.values()) + " |")
        for case in cases:
            cells = []
            for r in rows.values():
                c = r["compile_ms"][case]
                if isinstance(c, str):
                    cells.append(c)
                    continue
                mean, p99 = r["mask_us"][case]
                cells.append(f"compile {c:.1f} ms; mask {mean:.0f} µs (p99 {p99:.0f}){'' if r['valid'][case] else '; REFUSED A VALID TOKEN'}")
            print(f"| {case} | " + " | ".join(cells) + " |")
        if not args.no_hostile:
            print(f"\nHostile inputs (each in a child process, killed {args.limit_s:.0f} s after its tokenizer loads):\n")
            tok_dir = str(Path(tmp))
            results = {name: hostile(name, vocab, tok_dir, args.limit_s) for name in rows}
            print("| | " + " | ".join(rows) + " |\n|---|" + "---|" * len(rows))
            for case in hostile_cases():
                print(f"| {case} | " + " | ".join(results[n][case] for n in rows) + " |")


if __name__ == "__main__":
    main()
