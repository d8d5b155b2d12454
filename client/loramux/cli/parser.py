"""The `loramux` command line: every command, flag and default, in one argparse tree.

Connection and output flags are accepted before the command and after it (`loramux --target X
adapters list` and `loramux adapters list --target X`): the top-level parser holds their
defaults, and each client command declares them again without defaults, so that only a flag
given after the command replaces one given before it.
"""

from __future__ import annotations

import argparse
import os

DEFAULT_TARGET = "127.0.0.1:50051"
ROLES = ("system", "user", "assistant", "tool", "developer")  # --message ROLE:CONTENT roles
OUTPUTS = ("text", "json", "yaml")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("loramux")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _connection(parser: argparse.ArgumentParser, top: bool) -> None:
    """The flags every client command takes; at the top with their defaults, after a command
    without (argparse.SUPPRESS: absent means "as given before the command, or the default")."""
    def default(value):
        return value if top else argparse.SUPPRESS

    target = os.environ.get("LORAMUX_TARGET") or DEFAULT_TARGET
    group = parser.add_argument_group("connection and output (before or after the command)")
    group.add_argument("--target", default=default(target),
                       help=f"server address (default: LORAMUX_TARGET, else {DEFAULT_TARGET}); dns:/// or "
                            "ipv4: targets naming several replicas route each adapter to one")
    group.add_argument("--timeout", type=float, default=default(600.0), help="deadline per call, seconds (default 600)")
    group.add_argument("--api-key", default=default(None), help="API key sent with every call (default: LORAMUX_API_KEY)")
    group.add_argument("--tenant", default=default(None),
                       help="act for this tenant (operator keys; sent as x-loramux-tenant; default: LORAMUX_TENANT)")
    group.add_argument("--no-affinity", action="store_true", default=default(False),
                       help="with a target naming several replicas: do not route each adapter to one replica")
    group.add_argument("--tls", action="store_true", default=default(False), help="connect with TLS, trusting the system's roots")
    group.add_argument("--tls-ca", metavar="PEM", default=default(None), help="connect with TLS, trusting this CA bundle")
    group.add_argument("--tls-cert", metavar="PEM", default=default(None),
                       help="client certificate, for servers that require one (with --tls-key)")
    group.add_argument("--tls-key", metavar="PEM", default=default(None), help="the client certificate's private key")
    group.add_argument("-o", "--output", choices=OUTPUTS, default=default("text"),
                       help="text for people (default), or json / yaml for scripts (one document)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-tenant LoRA adapter inference server.")
    parser.add_argument("--version", action="version", version=f"loramux {version()}")
    _connection(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `serve`'s flags are made from the server's Settings (loramux.server.serve_command): `main`
    # hands `serve` and everything after it over, so the client commands never import the server.
    sub.add_parser("serve", help="serve a base model with LoRA adapters (needs the server extra)", add_help=False)
    client_commands = []

    def command(parent, name: str, help: str) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help)
        _connection(p, top=False)
        client_commands.append(p)
        return p

    adapters = sub.add_parser("adapters", help="load, unload, list and show adapters").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    load = command(adapters, "load", "register an adapter (and with --warm or --pin, place it now)")
    load.add_argument("adapter_id")
    load.add_argument("--source", required=True,
                      help="directory under an adapter root, hf://<repo_id>, or s3://bucket/path under an object root")
    load.add_argument("--revision", default="")
    load.add_argument("--pin", action="store_true", help="keep it on the accelerator, never evicted")
    load.add_argument("--warm", action="store_true", help="bring it onto the accelerator now")
    load.add_argument("--replace", action="store_true", help="replace an adapter of that id from another source")
    command(adapters, "unload", "unload an adapter").add_argument("adapter_id")
    command(adapters, "list", "list adapters")
    command(adapters, "show", "show one adapter").add_argument("adapter_id")

    gen = command(sub, "generate", "generate text, streamed to the terminal")
    gen.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids")
    src.add_argument("--message", action="append", metavar="[ROLE:]CONTENT",
                     help=f"a chat message (repeatable); ROLE is one of {', '.join(ROLES)} (default user)")
    gen.add_argument("--tools", metavar="FILE", help="tool definitions for the chat template (a JSON array, OpenAI's tools)")
    gen.add_argument("--chat-template-kwargs", metavar="JSON", help='more chat template variables, e.g. \'{"enable_thinking": false}\'')
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
    gen.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID", help="stop token (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (to --max-new-tokens or a stop)")
    gen.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                     help="each token's K most likely alternatives (with -o json/yaml; implies --no-stream)")
    gen.add_argument("--logprobs", action="store_true", help="each token's log-probability (with -o json/yaml)")
    gen.add_argument("--prompt-logprobs", type=int, metavar="K", help="score the prompt's tokens, with K alternatives (-o json/yaml)")
    shape = gen.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="the answer is a JSON object")
    shape.add_argument("--json-schema", metavar="FILE", help="the answer follows the JSON Schema in FILE")
    shape.add_argument("--regex", help="the answer matches this regex")
    shape.add_argument("--grammar", metavar="FILE", help="the answer follows the Lark grammar in FILE")
    shape.add_argument("--choice", action="append", metavar="TEXT", help="the answer is one of these (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    gen.add_argument("-n", type=int, default=0, metavar="N",
                     help="N completions of the prompt, sharing its prefill (printed whole, one after another)")

    merge = command(sub, "merge", "merge an adapter (or a weighted combination) into the base and write a checkpoint")
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
    merge.add_argument("--overwrite", action="store_true", help="replace an earlier merge's output in output_dir")
    merge.add_argument("--max-shard-mib", type=int, default=0, help="output shards at most this large (default: the server's)")
    merge.add_argument("--verify", action="store_true",
                       help="compare the merged model's logits with base + adapter before it is moved into place")
    merge.add_argument("--no-wait", action="store_true", help="print the operation's name and return (see `operations`)")

    operations = sub.add_parser("operations", help="list, show, wait for, cancel and delete merges").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    command(operations, "list", "the tenant's operations, running and finished")
    command(operations, "show", "one operation's progress (and result)").add_argument("name")
    wait = command(operations, "wait", "wait for an operation to finish, then show its result")
    wait.add_argument("name")
    command(operations, "cancel", "stop a running merge at its next tensor").add_argument("name")
    command(operations, "delete", "forget a finished operation").add_argument("name")

    command(sub, "info", "show what the server serves")

    keys = sub.add_parser("keys", help="manage the server's API keys file").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    create = keys.add_parser("create", help="make a key, print it once and add its hash to the keys file")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", required=True, choices=["user", "admin", "operator"])
    create.add_argument("--name", default="", help="a label for the key (shown in the file; names it to revoke or rotate)")
    create.add_argument("--expires", metavar="TIME", help="ISO 8601 time after which the key stops working")
    listing = keys.add_parser("list", help="the file's keys (names, tenants, roles, expiry; never a key)")
    listing.add_argument("-o", "--output", choices=OUTPUTS, default=argparse.SUPPRESS)
    revoke = keys.add_parser("revoke", help="remove a key (by name or id); the server stops accepting it at its next reload")
    revoke.add_argument("key", metavar="NAME_OR_ID")
    rotate = keys.add_parser("rotate", help="a new key in place of one (same tenant, role and name); the old one expires later")
    rotate.add_argument("key", metavar="NAME_OR_ID")
    rotate.add_argument("--old-expires-in", type=float, default=24.0, metavar="HOURS",
                        help="hours the old key keeps working, so callers can switch (default 24; 0: now)")
    for p in keys.choices.values():
        p.add_argument("--keys-file", default="loramux-keys.yaml", metavar="PATH",
                       help="the file `loramux serve --auth-keys-file` reads (default: ./loramux-keys.yaml)")

    completion = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=["bash", "zsh"])

    demo = sub.add_parser("demo", help="build a tiny model and adapters locally and tour the server")
    demo.add_argument("--cache-dir", help="where the demo's model and adapters are built (default ./.demo)")
    demo.add_argument("--rebuild", action="store_true", help="build the assets again")
    return parser
