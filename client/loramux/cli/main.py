"""`loramux`: serve, manage adapters and operations, generate, merge, manage API keys, and run
the demo.

Client commands talk to a running server (`--target`, else LORAMUX_TARGET, else
127.0.0.1:50051); connection and output flags go before or after the command (parser.py).
Read commands print text for people, or one JSON or YAML document with `-o json` / `-o yaml`.
`serve` and `demo` need the server extra (`pip install 'loramux[server]'`). Exit codes: 0
done, 1 the server refused (its error on one line, with the fields at fault), 2 bad usage or
local files, 130 interrupted (Ctrl-C; a merge being waited for is cancelled too).
"""

from __future__ import annotations

import datetime
import json
import sys
import time

from loramux.cli.output import emit, fields, note, table
from loramux.cli.parser import ROLES, build_parser


class UsageError(Exception):
    """A bad flag value or local file: one line, exit 2."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _main(argv)
    except UsageError as e:
        note(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        note("interrupted")
        return 130


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        try:
            from loramux.server.serve_command import run
        except ImportError as e:
            note(f"error: serve needs the server extra: pip install 'loramux[server]' ({e})")
            return 2
        return run(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":  # reached only with flags before it, which serve does not take
        raise UsageError("`serve` takes its own flags after it: loramux serve --model ... (see loramux serve --help)")
    if args.command == "demo":
        from loramux.demo.tour import run_demo

        return run_demo(args.cache_dir, rebuild=args.rebuild)
    if args.command == "keys":
        return _keys(args)
    if args.command == "completion":
        from loramux.cli.completion import script

        print(script(parser, args.shell))
        return 0
    from loramux.client import Client, LoramuxError

    try:
        client = Client(args.target, timeout=args.timeout, api_key=args.api_key, tls=args.tls, tenant=args.tenant,
                        affinity=False if args.no_affinity else None, **_tls_files(args))
    except (OSError, ValueError) as e:  # a PEM file that cannot be read, a certificate without its key
        raise UsageError(str(e)) from None
    try:
        with client:
            return _CLIENT_COMMANDS[args.command](client, args)
    except LoramuxError as e:
        note(f"error: {e}")
        for field, description in e.field_violations:
            if description not in e.message:  # the message usually says it already
                note(f"  {field}: {description}")
        return 1


def _tls_files(args) -> dict:
    def read(path):
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    return {"root_certificates": read(args.tls_ca), "certificate_chain": read(args.tls_cert), "private_key": read(args.tls_key)}


# -- keys (the local keys file) -----------------------------------------------------------------

def _keys(args) -> int:
    from loramux.server.errors import InvalidSettings
    from loramux.server.tenancy import keys

    try:
        if args.action == "create":
            key = keys.append_key(args.keys_file, args.tenant, args.role, args.name, args.expires)
            print(key)
            article = "an" if args.role[0] in "aeiou" else "a"
            note(f"added {article} {args.role} key for tenant {args.tenant!r} to {args.keys_file}; "
                 "the key above is shown only now")
        elif args.action == "list":
            entries = keys.list_keys(args.keys_file)
            emit(entries, args.output, lambda rows: table(("ID", "NAME", "TENANT", "ROLE", "EXPIRES"), [
                (e["id"], e["name"], e["tenant"], e["role"], e["expires"]) for e in rows]))
        elif args.action == "revoke":
            gone = keys.revoke_key(args.keys_file, args.key)
            note(f"revoked key {gone['name'] or gone['id']} (tenant {gone['tenant']!r}, role {gone['role']}); "
                 "the server stops accepting it when it reloads the file")
        else:  # rotate
            until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=args.old_expires_in)
            key, old = keys.rotate_key(args.keys_file, args.key, until.isoformat(timespec="seconds"))
            print(key)
            note(f"the new key above (shown only now) replaces key {old['name'] or old['id']}, which keeps working "
                 f"until {old['expires']}")
    except InvalidSettings as e:
        note(f"error: {e.message}")
        return 2
    except FileNotFoundError:
        note(f"error: no keys file at {args.keys_file}")
        return 2
    return 0


# -- client commands ----------------------------------------------------------------------------

def _adapters(client, args) -> int:
    if args.action == "load":
        info = client.load_adapter(args.adapter_id, source=args.source, revision=args.revision, pin=args.pin,
                                   warm=args.warm, replace=args.replace)
        emit(info, args.output)
    elif args.action == "unload":
        client.unload_adapter(args.adapter_id)
        emit({"unloaded": args.adapter_id}, args.output, lambda d: print(f"unloaded {args.adapter_id}"))
    elif args.action == "show":
        emit(client.get_adapter(args.adapter_id), args.output)
    else:
        emit(client.list_adapters(), args.output, lambda adapters: table(
            ("ADAPTER", "RANK", "TIER", "PINNED", "USES", "SOURCE"),
            [(a.adapter_id, a.rank, a.tier, "yes" if a.pinned else "", a.use_count, a.source) for a in adapters]))
    return 0


def _message(text: str) -> tuple[str, str]:
    """`ROLE:CONTENT` when ROLE is a chat role; anything else is the user's whole message
    ("Translate: hi" is a user message, not one from a role named Translate)."""
    role, sep, content = text.partition(":")
    if sep and role.strip().lower() in ROLES:
        return role.strip().lower(), content.lstrip()
    return "user", text


def _logit_bias(pairs: list[str]) -> dict[int, float]:
    bias = {}
    for pair in pairs:
        token, sep, value = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            bias[int(token)] = float(value)
        except ValueError:
            raise UsageError(f"--logit-bias {pair}: expected TOKEN_ID=BIAS, e.g. 17=-100") from None
    return bias


def _read_text(path: str | None, flag: str) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") from None


def _json_arg(text: str | None, flag: str, kind: type):
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{flag}: not JSON ({e})") from None
    if not isinstance(value, kind):
        raise UsageError(f"{flag}: expected a JSON {'array' if kind is list else 'object'}")
    return value


def _generate(client, args) -> int:
    kwargs = dict(
        adapter_id=args.adapter, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, min_p=args.min_p, min_tokens=args.min_tokens,
        logit_bias=_logit_bias(args.logit_bias), seed=args.seed, stop=args.stop, stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos, return_logprobs=args.logprobs, top_logprobs=args.top_logprobs,
        prompt_logprobs=args.prompt_logprobs, json_object=args.json,
        json_schema=_read_text(args.json_schema, "--json-schema"), regex=args.regex,
        grammar=_read_text(args.grammar, "--grammar"), choice=args.choice, n=args.n,
        tools=_json_arg(_read_text(args.tools, "--tools"), "--tools", list),
        chat_template_kwargs=_json_arg(args.chat_template_kwargs, "--chat-template-kwargs", dict),
    )
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
    elif args.prompt_token_ids is not None:
        try:
            kwargs["prompt_token_ids"] = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
        except ValueError:
            raise UsageError("--prompt-token-ids takes integers separated by commas, e.g. 1,2,3") from None
    else:
        kwargs["messages"] = [_message(m) for m in args.message]
    whole = args.no_stream or args.n > 1 or args.output != "text" or args.top_logprobs or args.logprobs \
        or args.prompt_logprobs is not None
    if whole:
        result = client.generate(**kwargs)
        if args.output != "text":
            emit(result, args.output)
            return 0
        if args.n > 1:
            for completion in result.completions:
                print(f"--- completion {completion.index} ({completion.finish_reason}) ---")
                print(completion.text)
        else:
            print(result.text)
        if args.logprobs or args.top_logprobs:
            rows = []
            for i, token in enumerate(result.token_ids):
                value = result.logprobs[i] if i < len(result.logprobs) else None
                alternatives = result.top_logprobs[i] if i < len(result.top_logprobs) else []
                rows.append((token, "" if value is None else f"{value:.4f}", [f"{a}:{v:.3f}" for a, v in alternatives]))
            table(("TOKEN", "LOGPROB", "ALTERNATIVES"), rows)
        usage = result.usage
        finish = ", ".join(c.finish_reason for c in result.completions) if result.completions else result.finish_reason
    else:
        usage = finish = None
        for chunk in client.generate_stream(**kwargs):
            print(chunk.text, end="", flush=True)
            if chunk.finish_reason:
                usage, finish = chunk.usage, chunk.finish_reason
        print()
    note(f"[{finish}; {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens]")
    return 0


def _merge(client, args) -> int:
    common = dict(overwrite=args.overwrite, max_shard_bytes=args.max_shard_mib << 20, verify=args.verify,
                  adapter_only=args.adapter_only, register_as=args.register_as)
    if args.combine:
        try:
            adapters = [(item.rsplit(":", 1)[0], float(item.rsplit(":", 1)[1])) for item in args.combine.split(",")]
        except (IndexError, ValueError):
            note("error: --combine takes ID:WEIGHT pairs separated by commas, e.g. a:0.5,b:0.5")
            return 2
        handle = client.combine(adapters, args.output_dir, method=args.method, density=args.density, svd_rank=args.svd_rank,
                                svd_clamp=args.svd_clamp, majority_sign_method=args.majority_sign_method, seed=args.seed,
                                **common)
    else:
        handle = client.merge(args.adapter_id, args.output_dir, **common)
    if args.no_wait:
        emit({"operation": handle.name}, args.output, lambda d: print(handle.name))
        return 0
    return _wait(handle, args, progress=args.output == "text", cancel_on_interrupt=True)


def _wait(handle, args, progress: bool, cancel_on_interrupt: bool = False) -> int:
    """Follow a merge to its end (a progress bar on stderr), then show its result. Ctrl-C
    cancels it on the server too when this command started it (`merge`); `operations wait`
    only stops watching."""
    try:
        while True:
            p = handle.progress()
            if progress:
                filled = int(p.percent / 5)
                print(f"\r[{'#' * filled}{'.' * (20 - filled)}] {p.percent:5.1f}% {p.bytes_done / 2**20:,.0f}/"
                      f"{p.bytes_total / 2**20:,.0f} MiB {p.tensors_done}/{p.tensors_total} tensors {p.phase:<15}",
                      end="", file=sys.stderr, flush=True)
            if p.done:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            raise
        handle.cancel()
        note(f"\ncancelled {handle.name}")
        return 130
    if progress:
        note("")
    result = handle.result()

    def text(r) -> None:
        print(f"wrote {r.output_path} ({len(r.files)} files, {r.size_bytes} bytes, {r.merged_tensors} tensors merged)")
        if getattr(args, "register_as", ""):
            print(f"registered as {args.register_as}")
        if r.max_logit_difference is not None:
            print(f"verified: largest logit difference from base + adapter {r.max_logit_difference:.3g}")
    emit(result, args.output, text)
    return 0


def _operations(client, args) -> int:
    if args.action == "list":
        emit(client.list_operations(), args.output, lambda ops: table(
            ("OPERATION", "PHASE", "PERCENT", "DONE", "ERROR"),
            [(p.operation, p.phase, f"{p.percent:.0f}%", p.done, p.error) for p in ops]))
        return 0
    handle = client.operation(args.name)
    if args.action == "show":
        progress = handle.progress()
        result = handle.result() if progress.done and not progress.error else None
        emit({"progress": progress, "result": result}, args.output,
             lambda d: (fields(progress), fields(result) if result is not None else None))
    elif args.action == "wait":
        return _wait(handle, args, progress=args.output == "text")
    elif args.action == "cancel":
        handle.cancel()
        emit({"cancelled": args.name}, args.output, lambda d: print(f"cancelling {args.name}"))
    else:
        handle.delete()
        emit({"deleted": args.name}, args.output, lambda d: print(f"deleted {args.name}"))
    return 0


def _info(client, args) -> int:
    emit(client.server_info(), args.output)
    return 0


_CLIENT_COMMANDS = {"adapters": _adapters, "generate": _generate, "merge": _merge, "operations": _operations,
                    "info": _info}

if __name__ == "__main__":
    sys.exit(main())
