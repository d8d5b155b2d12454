"""What a request asks structured output for (`Constraint`), bounded and checked, and the
structured-output library's grammar for it: no torch, so that the grammar check's child
process (grammar_check.py) imports only this and the library.

The library (llguidance) runs native code; a constraint it cannot handle may crash or hang
the process that compiles it. Numbers are refused here (MAX_SCHEMA_NUMBER); whatever else a
constraint does to the library, grammar_check.py meets it in a child process first.
"""

from __future__ import annotations

import copy
import dataclasses
import json

from loramux.server.errors import InvalidRequest

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_SPEC_BYTES = 128 * 1024  # a schema, regex or grammar's text (a 128 KiB grammar compiles in well under a second)
MAX_CHOICES = 1024
LEXER_STATES = 20_000  # per row (llguidance: 1-2 kB each, default 250,000): at most ~40 MB per constrained row
# Parser items per mask step (llguidance's default 50,000). A grammar that forces a long text
# again and again after a first choice (`start: ("a"|"b") x`, `x: T0 x`, `T0: "q"{3000}`)
# passes a check of its first step, then spends minutes and gigabytes in its second mask at the
# default (measured with 1.9.1: 10 GB in 40 s, or an abort under an address-space limit). Time
# and memory grow with this limit: at 1,000, about 1 s and 0.6 GB at worst (a 5,000-character
# forced text); schemas of 300 properties, 20 alternatives of objects, recursion and 3,000-value
# enums use far fewer (their masks took at most 2 ms over 80 random steps at 300).
STEP_ITEMS = 1000
# JSON is written compactly, as json.dumps writes it: free whitespace lets a model pad its
# answer with newlines until max_tokens, which is the commonest failure of JSON modes.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The largest magnitude a number in a JSON schema may have. llguidance turns integer values
# and bounds into 64-bit integers: beyond that range it saturates bounds silently (so an
# answer could break the schema) and, where a value lands on the most negative one, its
# process crashes (a segfault, measured with 1.9.1: `{"const": -9223372036854775807}`,
# integer bounds of -1e40). Numbers are refused from 2^62 on, well inside the safe side.
MAX_SCHEMA_NUMBER = 1 << 62


def tokenizer_text(tokenizer) -> str:
    """A fast (Rust) tokenizer as the JSON text the library reads, without padding or
    truncation (ValueError for a tokenizer that is not a fast one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("structured output needs a fast (Rust) tokenizer")
    backend = copy.copy(backend)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


def library_tokenizer(text: str, vocab_size: int, eos_ids: list[int]):
    """The library's state for a tokenizer (reads every token: about 2 s at 32,000)."""
    import llguidance

    return llguidance.LLTokenizer(text, n_vocab=vocab_size, eos_token=sorted(eos_ids) or None)


def compile_matcher(state, constraint: Constraint):
    """A matcher for `constraint` (InvalidRequest when it does not compile), within the
    library's work limits (each row's lexer at most LEXER_STATES states)."""
    import llguidance

    grammar = constraint.grammar()
    limits = llguidance.LLParserLimits(verbose_errors=False, max_lexer_states=LEXER_STATES,  # errors quote the grammar, never the server's state
                                       step_max_items=STEP_ITEMS)
    matcher = llguidance.LLMatcher(state, grammar, log_level=0, limits=limits)
    if matcher.is_error():
        raise invalid(f"the {constraint.kind} could not be compiled: {first_line(matcher.get_error())}")
    return matcher


@dataclasses.dataclass(frozen=True)
class Constraint:
    """`kind`: one of KINDS; `spec`: the JSON schema (JSON text), the regex, the Lark grammar
    or the choices (a JSON array of strings); empty for json_object."""

    kind: str
    spec: str = ""

    def check(self) -> None:
        if self.kind not in KINDS:
            raise invalid(f"the structured output kind must be one of {', '.join(KINDS)}, got {self.kind[:40]!r}")
        size = len(self.spec.encode())
        if size > MAX_SPEC_BYTES:
            raise invalid(f"the {self.kind} is {size} bytes, more than the {MAX_SPEC_BYTES} this server compiles",
                           reason="GRAMMAR_TOO_LARGE")
        if self.kind != "json_object" and not self.spec:
            raise invalid(f"{self.kind} needs its text")

    def grammar(self) -> str:
        """The llguidance grammar (its JSON form), or InvalidRequest when the text is malformed."""
        import llguidance

        matcher = llguidance.LLMatcher
        if self.kind == "json_object":
            return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "json_schema":
            schema = _json(self.spec, "json_schema")
            if schema is True:  # JSON Schema's "anything": any JSON value
                schema = {}
            if schema is False or not isinstance(schema, dict):
                raise invalid("json_schema must be a JSON Schema: an object, or true (false allows nothing)")
            _check_numbers(schema)
            return matcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return matcher.grammar_from_regex(self.spec)
        if self.kind == "grammar":
            for schema in _embedded_schemas(self.spec):
                _check_numbers(schema)
            return matcher.grammar_from_lark(self.spec)
        choices = _json(self.spec, "choice")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise invalid("choice must be a non-empty list of non-empty strings")
        if len(choices) > MAX_CHOICES:
            raise invalid(f"choice holds {len(choices)} strings, more than {MAX_CHOICES}")
        return matcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))


def _json(text: str, what: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise invalid(f"{what} is not valid JSON ({str(e)[:120]})") from None


def _check_numbers(value) -> None:
    """Refuse a schema holding a number of MAX_SCHEMA_NUMBER's magnitude or more, anywhere
    (bounds, const, enum, nested values): see MAX_SCHEMA_NUMBER. Walks without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, (int, float)) and not isinstance(item, bool) and not abs(item) < MAX_SCHEMA_NUMBER:
            shown = str(item) if len(str(item)) <= 24 else str(item)[:21] + "..."
            raise invalid(f"the schema holds the number {shown}; numbers in a schema must lie within "
                           f"+/-2^62 ({MAX_SCHEMA_NUMBER:,}), as the structured-output library reads them as 64-bit integers")


def _embedded_schemas(grammar: str):
    """The JSON schemas a Lark grammar embeds (`%json { ... }`); one that does not parse is
    left to the library, which refuses it."""
    decoder = json.JSONDecoder()
    at = grammar.find("%json")
    while at >= 0:
        start = at + len("%json")
        while start < len(grammar) and grammar[start].isspace():
            start += 1
        try:
            schema, _ = decoder.raw_decode(grammar, start)
        except (ValueError, RecursionError):
            schema = None
        if schema is not None:
            yield schema
        at = grammar.find("%json", start)


def invalid(message: str, reason: str = "INVALID_GRAMMAR") -> InvalidRequest:
    return InvalidRequest(message, field="structured_output", reason=reason)


def first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]
