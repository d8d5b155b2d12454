"""`loramux`: serve, manage adapters, generate, merge, and run the demo.

Client commands talk to a running server (--target); `serve` and `demo` need the server
extra (`pip install 'loramux[server]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

DEFAULT_TARGET = "127.0.0.1:50051"


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model with LoRA adapters over gRPC",
                       fromfile_prefix_chars="@")  # `@FILE`: more arguments, one per line (the chart's ConfigMap)
    p.add_argument("--model", required=True, help="local model directory or Hugging Face Hub id")
    p.add_argument("--revision", help="Hub revision of the model")
    p.add_argument("--model-name", help="name adapters' base_model_name_or_path is checked against (default: --model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="place the layers over several GPUs (accelerate); adapter slots follow their layers")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "bnb-8bit", "bnb-4bit"],
                   help="the base's Linear weights held as int8 (torchao weight-only), bitsandbytes 8-bit or 4-bit "
                        "(NF4); adapters stay in --dtype")
    p.add_argument("--kv-cache", default="dynamic", choices=["dynamic", "static"],
                   help="static: --max-batch-size rows of --kv-cache-tokens positions allocated at start-up, filled and "
                        "freed row by row (each request's context is --kv-cache-tokens)")
    p.add_argument("--kv-cache-tokens", type=int,
                   help="positions per static KV row (default: --max-batch-tokens / --max-batch-size)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile, LoRA inside the graph (warmed at start-up)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--adapter-root", action="append", default=[], metavar="DIR", help="directory local adapters must lie under (repeatable)")
    p.add_argument("--merge-root", metavar="DIR", help="directory merged checkpoints are written under (default: merging off)")
    p.add_argument("--merge-shard-mib", type=int,
                   help="merged checkpoints' shards at most this large (default: the base's largest shard)")
    p.add_argument("--adapter-slots", type=int, default=64, help="adapters resident on the accelerator at once, at most")
    p.add_argument("--adapter-memory-mib", type=float,
                   help="accelerator memory for resident adapters, at their true sizes "
                        "(default: 8 adapters of --max-lora-rank on every served module)")
    p.add_argument("--host-cache-mib", type=int, default=1024, help="host memory for adapters evicted from slots")
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--target-modules", default="all-linear",
                   help="comma-separated Linear names that get adapter slots, or all-linear: every Linear "
                        "(and Conv1D) layer but the output layer")
    p.add_argument("--max-batch-size", type=int, default=16, help="rows decoding together at most")
    p.add_argument("--max-batch-tokens", type=int, default=65536,
                   help="padded KV cache the batch may reach: rows x (widest prompt + output), in tokens")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="prompt tokens prefilled in one step at most")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="when idle, start once no request has arrived for this long (at most 4x after the first)")
    p.add_argument("--join-ratio", type=float, default=0.25,
                   help="while rows decode, prefill waiting requests once they are this share of the running rows")
    p.add_argument("--join-max-steps", type=int, default=8, help="... or once the oldest has waited this many steps")
    p.add_argument("--adapter-wait-ms", type=float, default=2000.0,
                   help="how long a request may be passed over for ones whose adapters are in slots")
    p.add_argument("--scheduling", default="continuous", choices=["continuous", "static"])
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--max-queue-per-tenant", type=int,
                   help="requests one tenant may have waiting (default: no fixed bound; a full queue refuses the tenant "
                        "holding the most places first)")
    p.add_argument("--tenant-max-adapters", type=int, default=1000,
                   help="adapters one tenant may register, unless the keys file gives its adapters quota")
    p.add_argument("--tenant-max-merge-outputs", type=int, default=8,
                   help="merge outputs one tenant may keep, unless the keys file gives its merge_outputs quota")
    p.add_argument("--tenant-max-merge-output-gib", type=int,
                   help="GiB of merge outputs one tenant may keep (default: no limit beyond the count)")
    p.add_argument("--merge-disk-reserve-mib", type=int, default=1024,
                   help="a merge starts only if the merge disk keeps this much free after it")
    p.add_argument("--operation-retention-s", type=float, default=7 * 24 * 3600.0,
                   help="finished operations (every replica's) are kept this long, then removed")
    p.add_argument("--default-max-new-tokens", type=int, default=64)
    p.add_argument("--max-prompt-bytes", type=int, default=1 << 20,
                   help="prompt text above this many UTF-8 bytes is refused before tokenizing")
    p.add_argument("--slot-wait-s", type=float, default=10.0,
                   help="LoadAdapter warm/pin: how long to wait for a free slot before NO_SLOT_AVAILABLE")
    p.add_argument("--engine-stall-s", type=float, default=60.0,
                   help="health says NOT_SERVING while one engine pass runs longer than this")
    p.add_argument("--shutdown-grace-s", type=float, default=5.0,
                   help="on SIGTERM: how long work in flight may finish before it is ended with SHUTTING_DOWN")
    p.add_argument("--state-dir", metavar="DIR",
                   help="keep adapter registrations and operations here across restarts (default: nothing kept); "
                        "replicas may share one on a ReadWriteMany volume")
    p.add_argument("--registry", metavar="URL",
                   help="keep adapter registrations in object storage (s3://bucket/prefix), shared by every replica")
    p.add_argument("--registry-sync-s", type=float, default=2.0,
                   help="how often each replica follows registrations made, replaced or unloaded on the others")
    p.add_argument("--replica-id", help="this replica's name in the shared state (default: the host name)")
    p.add_argument("--object-root", action="append", default=[], metavar="URL",
                   help="object-storage prefix (s3://bucket/prefix) adapter sources may lie under (repeatable)")
    p.add_argument("--object-endpoint-url", metavar="URL",
                   help="endpoint of an S3-compatible store (MinIO, Ceph); credentials come from the AWS_* environment")
    p.add_argument("--object-cache-dir", metavar="DIR",
                   help="local disk for adapters fetched from object storage (default: a temporary directory)")
    p.add_argument("--auth", default="keys", choices=["keys", "none"],
                   help="keys: every call needs an API key from --auth-keys-file; none: no credentials (development only)")
    p.add_argument("--auth-keys-file", metavar="PATH",
                   help="YAML or JSON file of key hashes, tenants and roles (`loramux keys create` writes it); reloaded when it changes")
    p.add_argument("--max-connection-age-s", type=float, default=300.0,
                   help="clients reconnect after this long, so that they see new replicas (0: never)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS only, with this certificate chain (and --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--health-port", type=int,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes that cannot speak TLS)")
    p.add_argument("--tls-client-ca", metavar="PEM",
                   help="mutual TLS: clients must present a certificate this CA signed (the keys file may map its CN to a tenant)")
    p.add_argument("--base-mismatch", default="error", choices=["error", "warn"],
                   help="an adapter trained on another base model: refuse it, or log and load")
    p.add_argument("--allow-pickle-weights", action="store_true", help="load adapter_model.bin when there is no safetensors file")
    p.add_argument("--hub-cache-dir", help="Hugging Face cache for the Hub base model and hf:// adapters")
    p.add_argument("--hub-offline", action="store_true", help="resolve the Hub base model and hf:// adapters from the local cache only")
    p.add_argument("--hub-endpoint", metavar="URL", help="the Hub's address, e.g. a mirror (default: huggingface_hub's)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one JSON object per line, with trace_id and span_id inside requests")
    otel = p.add_argument_group("telemetry", "flags left unset fall back to the standard OTEL_* variables")
    otel.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at http://HOST:PORT/metrics")
    otel.add_argument("--metrics-host", default="127.0.0.1",
                      help="address of the metrics endpoint (default: loopback; its series name tenants and adapters)")
    otel.add_argument("--otel-traces-exporter", metavar="LIST",
                      help="otlp, console, both comma-separated, or none (env OTEL_TRACES_EXPORTER; default none)")
    otel.add_argument("--otel-metrics-exporter", metavar="LIST",
                      help="push metrics too: otlp, console or none (env OTEL_METRICS_EXPORTER; default none)")
    otel.add_argument("--otel-exporter-otlp-protocol", choices=["grpc", "http/protobuf"],
                      help="env OTEL_EXPORTER_OTLP_PROTOCOL; default grpc")
    otel.add_argument("--otel-exporter-otlp-endpoint", metavar="URL",
                      help="collector endpoint (env OTEL_EXPORTER_OTLP_ENDPOINT; default the exporter's)")
    otel.add_argument("--otel-service-name", help="env OTEL_SERVICE_NAME; default loramux")


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
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="wait for the whole answer")

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
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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


# Settings fields whose serve flag is not simply --field-name.
_FLAG_OF_FIELD = {
    "adapter_roots": "--adapter-root",
    "object_roots": "--object-root",
    "traces_exporters": "--otel-traces-exporter",
    "metrics_exporters": "--otel-metrics-exporter",
    "otlp_protocol": "--otel-exporter-otlp-protocol",
    "otlp_endpoint": "--otel-exporter-otlp-endpoint",
    "service_name": "--otel-service-name",
}


def _serve(args) -> int:
    import asyncio

    from loramux.server.app import serve
    from loramux.server.errors import InvalidSettings
    from loramux.server.telemetry.logs import configure_logging

    try:
        settings = serve_settings(args)
    except InvalidSettings as e:
        return _bad_setting(e)
    configure_logging(args.log_level, args.log_format)
    try:
        asyncio.run(serve(settings))
    except InvalidSettings as e:  # found at start-up (a keys file that does not parse)
        return _bad_setting(e)
    return 0


def serve_settings(args):
    """The validated Settings that `serve`'s parsed flags (and OpenTelemetry's environment
    variables) give; InvalidSettings if they do not hold together."""
    from loramux.server.settings import Settings

    def env(flag, name: str, default):
        """A flag, else the standard OpenTelemetry environment variable, else the default."""
        return flag if flag is not None else os.environ.get(name, default)

    def exporters(value: str) -> tuple[str, ...]:
        return tuple(e.strip() for e in value.split(",") if e.strip() and e.strip() != "none")

    converted = dict(
        adapter_roots=tuple(args.adapter_root),
        object_roots=tuple(args.object_root),
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
        service_name=env(args.otel_service_name, "OTEL_SERVICE_NAME", "loramux"),
        traces_exporters=exporters(env(args.otel_traces_exporter, "OTEL_TRACES_EXPORTER", "none")),
        metrics_exporters=exporters(env(args.otel_metrics_exporter, "OTEL_METRICS_EXPORTER", "none")),
        otlp_protocol=env(args.otel_exporter_otlp_protocol, "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        otlp_endpoint=env(args.otel_exporter_otlp_endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT", None),
    )
    # Every other flag is named as its Settings field (`--max-batch-size` -> max_batch_size).
    named = {f.name for f in dataclasses.fields(Settings)} & vars(args).keys() - converted.keys()
    return Settings(**{name: getattr(args, name) for name in named}, **converted)


def _bad_setting(e) -> int:
    flag = _FLAG_OF_FIELD.get(e.field, "--" + e.field.replace("_", "-"))
    print(f"error: {flag}: {e.message}", file=sys.stderr)
    return 2


def _tls_files(args) -> dict:
    def read(path):
        return open(path, "rb").read() if path else None

    return {"root_certificates": read(args.tls_ca), "certificate_chain": read(args.tls_cert), "private_key": read(args.tls_key)}


def _keys(args) -> int:
    from loramux.server.errors import InvalidSettings
    from loramux.server.keys import append_key

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


def _generate(client, args) -> int:
    kwargs = dict(
        adapter_id=args.adapter,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )
    if args.prompt is not None:
        kwargs["prompt"] = args.prompt
    elif args.prompt_token_ids is not None:
        kwargs["prompt_token_ids"] = [int(t) for t in args.prompt_token_ids.split(",") if t.strip()]
    else:
        kwargs["messages"] = [tuple(m.split(":", 1)) if ":" in m else ("user", m) for m in args.message]
    if args.no_stream:
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
