"""`loramux`: serve, manage adapters, generate, merge, and run the demo.

Client commands talk to a running server (--target); `serve` and `demo` need the server
extra (`pip install 'loramux[server]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve_parser(sub) -> None:
    # Its flags are made from the server's Settings (loramux.server.serve_command): `main` hands
    # `serve` and everything after it over, so the client commands never import the server.
    sub.add_parser("serve", help="serve a base model with LoRA adapters over gRPC (needs the server extra)",
                   add_help=False)


def _client_parsers(sub) -> None:
    adapters = sub.add_parser("adapters", help="load, unload, list and show adapters").add_subparsers(dest="action", required=True)
    load = adapters.add_parser("load", help="load an adapter")
    load.add_argument("adapter_id")
    load.add_argument("--source", required=True, help="directory under an adapter root, hf://<repo_id>, or s3://bucket/path under an object root")
    load.add_argument("--revision", default="")
    load.add_argument("--pin", action="store_true", help="keep it on the accelerator, never evicted")
    load.add_argument("--warm", action="store_true", help="bring it onto the accelerator now")
    load.add_argument("--replace", action="store_true", help="replace an adapter of that id from another source")
    adapters.add_parser("unload", help="unload an adapter").add_argument("adapter_id")
    adapters.add_parser("list", help="list adapters")
    adapters.add_parser("show", help="show one adapter").add_argument("adapter_id")

    gen = sub.add_parser("generate", help="generate text, streamed to the terminal")
    gen.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids")
    src.add_argument("--message", action="append", metavar="ROLE:CONTENT", help="a chat message (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--repetition-penalty", type=float, default=0.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="in [-2, 2], on tokens already in the output")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="in [-2, 2], per occurrence in the output")
    gen.add_argument("--min-p", type=float, default=0.0, help="sampling drops tokens below min-p x the most likely one")
    gen.add_argument("--min-tokens", type=int, default=0, help="EOS and stop tokens cannot end generation before this")
    gen.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN_ID=BIAS",
                     help="added to a token's logit, in [-100, 100] (repeatable)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--json-schema", metavar="FILE", help="the answer follows the JSON Schema in FILE")
    shape.add_argument("--regex", help="the answer matches this regex")
    shape.add_argument("--grammar", metavar="FILE", help="the answer follows the Lark grammar in FILE")
    shape.add_argument("--choice", action="append", metavar="TEXT", help="the answer is one of these (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    gen.add_argument("-n", type=int, default=0, metavar="N",
                     help="N completions of the prompt, sharing its prefill (printed whole, one after another)")

    merge = sub.add_parser("merge", help="merge an adapter (or a weighted combination) into the base and write a checkpoint")
    merge.add_argument("adapter_id", nargs="?", default="", help="the adapter (leave out with --combine)")
    merge.add_argument("output_dir", help="directory under the server's merge root")
    merge.add_argument("--combine", metavar="ID:WEIGHT,...", help="a weighted combination instead of one adapter, e.g. a:0.5,b:0.5")
    merge.add_argument("--method", default="svd", help="combination method (peft's: linear, cat, svd, ties, ties_svd, "
                       "dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd)")
    merge.add_argument("--density", type=float, default=0.0, help="ties, dare and magnitude_prune: the fraction kept")
    merge.add_argument("--svd-rank", type=int, default=0, help="svd methods: the new rank (default: the largest input rank)")
    merge.add_argument("--svd-clamp", type=float, default=0.0, help="svd methods: clamp the factors at this quantile")
    merge.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    merge.add_argument("--seed", type=int, default=0, help="dare methods: the seed of their random pruning")
    merge.add_argument("--adapter-only", action="store_true", help="write a LoRA adapter, not a merged model")
    merge.add_argument("--register-as", default="", help="with --adapter-only: register the written adapter under this id")
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--max-shard-mib", type=int, default=0, help="output shards at most this large (default: the server's)")
    merge.add_argument("--verify", action="store_true",
                       help="compare the merged model's logits with base + adapter before it is moved into place")

    sub.add_parser("info", help="show what the server serves")

    for p in (gen, merge, sub.choices["info"], *adapters.choices.values()):
        p.add_argument("--target", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
        p.add_argument("--timeout", type=float, default=600.0, help="deadline per call, seconds")
        p.add_argument("--api-key", help="API key sent with every call (default: the LORAMUX_API_KEY environment variable)")
        p.add_argument("--no-affinity", action="store_true",
                       help="with a dns:/ipv4: target naming several replicas: do not route each adapter to one replica")
        p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
        p.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, trusting this CA bundle")
        p.add_argument("--tls-cert", metavar="PEM", help="client certificate, for servers that require one (with --tls-key)")
        p.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")

    keys = sub.add_parser("keys", help="manage the server's API keys file").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="make a key, print it once and add its hash to the keys file")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", required=True, choices=["user", "admin", "operator"])
    create.add_argument("--keys-file", default="loramux-keys.yaml", metavar="PATH",
                        help="the file `loramux serve --auth-keys-file` reads (default: ./loramux-keys.yaml; created if missing)")
    create.add_argument("--name", default="", help="a label for the key (shown in the file)")
    create.add_argument("--expires", metavar="TIME", help="ISO 8601 time after which the key stops working")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-tenant LoRA adapter inference server.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _client_parsers(sub)
    demo = sub.add_parser("demo", help="build a tiny model and adapters locally and tour the server")
    demo.add_argument("--cache-dir", help="where the demo's model and adapters are built (default ./.demo)")
    demo.add_argument("--rebuild", action="store_true", help="build the assets again")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        try:
            from loramux.server.serve_command import run
        except ImportError as e:
            print(f"error: serve needs the server extra: pip install 'loramux[server]' ({e})", file=sys.stderr)
            return 2
        return run(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from loramux.demo.tour import run_demo

        return run_demo(args.cache_dir, rebuild=args.rebuild)
    if args.command == "keys":
        return _keys(args)
    from loramux.client import Client, LoramuxError

    try:
        tls_files = _tls_files(args)
        client = Client(args.target, timeout=args.timeout, api_key=args.api_key, tls=args.tls,
                        affinity=False if args.no_affinity else None, **tls_files)
    except (OSError, ValueError) as e:  # a PEM file that cannot be read, a certificate without its key
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        with client:
            return _CLIENT_COMMANDS[args.command](client, args)
    except LoramuxError as e:
        print(f"error: {e}", file=sys.stderr)
        for field, description in e.field_violations:
            print(f"  {field}: {description}", file=sys.stderr)
        return 1


def _tls_files(args) -> dict:
    def read(path):
        return open(path, "rb").read() if path else None

    return {"root_certificates": read(args.tls_ca), "certificate_chain": read(args.tls_cert), "private_key": read(args.tls_key)}


def _keys(args) -> int:
    from loramux.server.errors import InvalidSettings
    from loramux.server.tenancy.keys import append_key

    try:
        key = append_key(args.keys_file, args.tenant, args.role, args.name, args.expires)
    except InvalidSettings as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(key)
    print(f"added a {args.role} key for tenant {args.tenant!r} to {args.keys_file}; the key above is shown only now",
          file=sys.stderr)
    return 0


def _adapters(client, args) -> int:
    if args.action == "load":
        info = client.load_adapter(
            args.adapter_id, source=args.source, revision=args.revision, pin=args.pin, warm=args.warm, replace=args.replace
        )
        _show(info)
    elif args.action == "unload":
        client.unload_adapter(args.adapter_id)
        print(f"unloaded {args.adapter_id}")
    elif args.action == "show":
        _show(client.get_adapter(args.adapter_id))
    else:
        rows = [(a.adapter_id, str(a.rank), a.tier, "yes" if a.pinned else "", str(a.use_count), a.source) for a in client.list_adapters()]
        _table(("ADAPTER", "RANK", "TIER", "PINNED", "USES", "SOURCE"), rows)
    return 0


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    bias = {}
    for pair in pairs:
        token, sep, value = pair.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise SystemExit(f"error: --logit-bias {pair}: expected TOKEN_ID=BIAS, e.g. 17=-100") from None
        if not sep:
            raise SystemExit(f"error: --logit-bias {pair}: expected TOKEN_ID=BIAS, e.g. 17=-100")
    return bias


def _read_text(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: {flag} {path}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") from None


def _generate(client, args) -> int:
    kwargs = dict(
        adapter_id=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        min_p=args.min_p,
        min_tokens=args.min_tokens,
        logit_bias=_logit_bias(args.logit_bias),
        seed=args.seed,
        stop=args.stop,
        json_object=args.json,
        json_schema=_read_text(args.json_schema, "--json-schema"),
        regex=args.regex,
        grammar=_read_text(args.grammar, "--grammar"),
        choice=args.choice,
    )
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
    elif args.prompt_token_ids is not None:
        kwargs["prompt_token_ids"] = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
    else:
        kwargs["messages"] = [tuple(m.split(":", 1)) if ":" in m else ("user", m) for m in args.message]
    if args.n > 1:
        kwargs["n"] = args.n
        result = client.generate(**kwargs)
        for completion in result.completions:
            print(f"--- completion {completion.index} ({completion.finish_reason}) ---")
            print(completion.text)
        usage, finish = result.usage, ", ".join(c.finish_reason for c in result.completions)
    elif args.no_stream:
        kwargs["n"] = args.n
        result = client.generate(**kwargs)
        print(result.text)
        usage, finish = result.usage, result.finish_reason
    else:
        for chunk in client.generate_stream(**kwargs):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                usage, finish = chunk.usage, chunk.finish_reason
        print()
    print(f"[{finish}; {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens]", file=sys.stderr)
    return 0


def _merge(client, args) -> int:
    common = dict(overwrite=args.overwrite, max_shard_bytes=args.max_shard_mib << 20, verify=args.verify,
                  adapter_only=args.adapter_only, register_as=args.register_as)
    if args.combine:
        try:
            adapters = [(item.rsplit(":", 1)[0], float(item.rsplit(":", 1)[1])) for item in args.combine.split(",")]
        except (IndexError, ValueError):
            print("--combine takes ID:WEIGHT pairs separated by commas, e.g. a:0.5,b:0.5", file=sys.stderr)
            return 2
        handle = client.combine(adapters, args.output_dir, method=args.method, density=args.density, svd_rank=args.svd_rank,
                                svd_clamp=args.svd_clamp, majority_sign_method=args.majority_sign_method, seed=args.seed,
                                **common)
    else:
        handle = client.merge(args.adapter_id, args.output_dir, **common)
    try:
        while True:
            p = handle.progress()
            filled = int(p.percent / 5)
            print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {p.percent:5.1f}% {p.bytes_done / 2**20:,.0f}/"
                  f"{p.bytes_total / 2**20:,.0f} MiB {p.tensors_done}/{p.tensors_total} tensors {p.phase:<15}",
                  end="", file=sys.stderr, flush=True)
            if p.done:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:  # Ctrl-C cancels the merge on the server too
        handle.cancel()
        print(f"\ncancelled {handle.name}", file=sys.stderr)
        return 130
    print(file=sys.stderr)
    result = handle.result()
    print(f"wrote {result.output_path} ({len(result.files)} files, {result.size_bytes} bytes, {result.merged_tensors} tensors merged)")
    if args.register_as:
        print(f"registered as {args.register_as}")
    if result.max_logit_difference is not None:
        print(f"verified: largest logit difference from base + adapter {result.max_logit_difference:.3g}")
    return 0


def _info(client, args) -> int:
    _show(client.server_info())
    return 0


def _show(obj) -> None:
    for field in dataclasses.fields(obj):
        print(f"{field.name}: {getattr(obj, field.name)}")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


_CLIENT_COMMANDS = {"adapters": _adapters, "generate": _generate, "merge": _merge, "info": _info}

if __name__ == "__main__":
    sys.exit(main())
