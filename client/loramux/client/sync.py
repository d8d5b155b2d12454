"""The blocking client."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from loramux.client import _convert, _core, types
from loramux.client._auth import key_header, resolve_api_key, resolve_tenant, tenant_header
from loramux.client._headers import HeaderInterceptor
from loramux.client._routing import AffinityRouter, channel_options, wants_affinity
from loramux.client.errors import from_rpc_error
from loramux.v1 import adapter_pb2, loramux_service_pb2, loramux_service_pb2_grpc


def _translated(method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    return call


class MergeHandle:
    """A running merge: poll `progress()`, or block on `result()`."""

    def __init__(self, client: Client, operation: operations_pb2.Operation):
        self._client = client
        self._op = operation

    @property
    def name(self) -> str:
        return self._op.name

    @_translated
    def progress(self) -> types.MergeProgress:
        self._op = self._client._operations.GetOperation(operations_pb2.GetOperationRequest(name=self.name), timeout=self._client.timeout)
        return _convert.merge_progress(self._op)

    @_translated
    def result(self, timeout: float | None = None) -> types.MergeResult:
        """Wait for the merge (at most `timeout` seconds) and return what it wrote; raises its error."""
        self._op = _core.drive(_core.wait_merge(self._op, timeout), self._client._stubs)
        return _convert.merge_result(self._op)

    @_translated
    def cancel(self) -> None:
        """Stop the merge at its next tensor; it ends with CANCELLED and writes nothing."""
        self._client._operations.CancelOperation(operations_pb2.CancelOperationRequest(name=self.name),
                                                 timeout=self._client.timeout)

    @_translated
    def delete(self) -> None:
        """Forget the finished merge's operation on the server (FAILED_PRECONDITION while it runs)."""
        self._client._operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=self.name),
                                                 timeout=self._client.timeout)


class Client:
    """Blocking loramux client. `timeout` is the default deadline (seconds) for each call.

    Every call is traced by OpenTelemetry's gRPC client interceptor, with the W3C trace
    context sent to the server: through `tracer_provider`, or the global one (a no-op until
    the application installs the SDK). Use as a context manager, or call close()."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        channel: grpc.Channel | None = None,
        options: list[tuple[str, object]] | None = None,
        tracer_provider=None,
        api_key: str | None = None,
        affinity: bool | None = None,
        tenant: str | None = None,
    ):
        """`api_key`: sent as `authorization: Bearer <key>` on every call (default: the
        LORAMUX_API_KEY environment variable; none for a server run with `--auth none`).
        `tenant`: an operator key acts for this tenant (`x-loramux-tenant`; default: the
        LORAMUX_TENANT environment variable; none: the key's own tenant).
        `affinity`: route each adapter's requests to one replica with gRPC's ring_hash
        (`_routing.py`); default on for `dns:`/`ipv4:`/`ipv6:` targets, which can name several."""
        from opentelemetry.instrumentation.grpc import client_interceptor
        from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

        api_key = resolve_api_key(api_key)
        affinity = wants_affinity(target) if affinity is None else affinity
        if channel is None:
            creds = _convert.channel_credentials(tls, root_certificates, private_key, certificate_chain)
            if affinity:
                options = channel_options(options)
            channel = grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)
        self._channel = channel
        self._router = AffinityRouter(api_key) if affinity else None
        if self._router is not None:
            channel = grpc.intercept_channel(channel, HeaderInterceptor(self._router.header_for))
        if api_key:
            channel = grpc.intercept_channel(channel, HeaderInterceptor(key_header(api_key)))
        tenant = resolve_tenant(tenant)
        if tenant:
            channel = grpc.intercept_channel(channel, HeaderInterceptor(tenant_header(tenant)))
        channel = intercept_channel(channel, client_interceptor(tracer_provider=tracer_provider))
        self.timeout = timeout
        self._stub = loramux_service_pb2_grpc.LoramuxStub(channel)
        self._operations = operations_pb2_grpc.OperationsStub(channel)

    @property
    def _stubs(self) -> dict[str, object]:
        return {"loramux": self._stub, "operations": self._operations}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @_translated
    def generate(self, *, timeout: float | None = None, **kwargs) -> types.GenerateResult:
        """Generate to the end. Takes exactly one of prompt=, prompt_token_ids=, messages=,
        and adapter_id= (empty: the base model) plus sampling parameters
        (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop,
        stop_token_ids, return_logprobs, ignore_eos, presence_penalty, frequency_penalty, min_p,
        logit_bias, min_tokens, top_logprobs), and at most one structured output: json_object=True,
        json_schema= (a dict or JSON text), regex=, grammar= (Lark) or choice= (strings); n= for
        several completions of the prompt (the result's `completions`; streamed, each chunk's
        `index`)."""
        response = self._stub.Generate(_convert.generate_request(**kwargs), timeout=self._deadline(timeout))
        return _convert.generate_result(response)

    def generate_stream(self, *, timeout: float | None = None, **kwargs) -> Iterator[types.StreamChunk]:
        """Like generate, yielding chunks as tokens are decoded; the last has finish_reason set.
        Closing the iterator early cancels the request on the server."""
        call = self._stub.GenerateStream(_convert.generate_request(**kwargs), timeout=self._deadline(timeout))
        try:
            for chunk in call:
                yield _convert.stream_chunk(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            # Traced, the call is the interceptor's generator: closing it releases the gRPC call,
            # which cancels it (grpc cancels a call that is dropped before it ends).
            if hasattr(call, "cancel"):
                call.cancel()
            else:
                call.close()

    @_translated
    def list_operations(self, *, timeout: float | None = None) -> list[types.MergeProgress]:
        """The caller's tenant's operations (merges), running and finished, by name."""
        found, token = [], ""
        while True:
            page = self._operations.ListOperations(operations_pb2.ListOperationsRequest(page_size=1000, page_token=token),
                                                   timeout=self._deadline(timeout))
            found += [_convert.merge_progress(op) for op in page.operations]
            token = page.next_page_token
            if not token:
                return found

    @_translated
    def operation(self, name: str, *, timeout: float | None = None) -> MergeHandle:
        """A handle on an operation by name (its progress, result, cancel and delete)."""
        op = self._operations.GetOperation(operations_pb2.GetOperationRequest(name=name), timeout=self._deadline(timeout))
        return MergeHandle(self, op)

    @_translated
    def load_adapter(
        self, adapter_id: str, *, source: str, revision: str = "", pin: bool = False, warm: bool = False,
        replace: bool = False, timeout: float | None = None,
    ) -> types.AdapterInfo:
        request = _core.load_adapter_request(adapter_id, source, revision, pin, warm, replace)
        return _convert.adapter_info(self._stub.LoadAdapter(request, timeout=self._deadline(timeout)))

    @_translated
    def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        self._stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout=self._deadline(timeout))

    @_translated
    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> types.AdapterInfo:
        response = self._stub.GetAdapter(adapter_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=self._deadline(timeout))
        return _convert.adapter_info(response)

    @_translated
    def list_adapters(self, *, page_size: int = 0, timeout: float | None = None) -> list[types.AdapterInfo]:
        """Every adapter of the caller's tenant, following pages."""
        return _core.drive(_core.list_adapters(page_size, self._deadline(timeout)), self._stubs)

    @_translated
    def merge(
        self, adapter_id: str, output_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 0,
        verify: bool = False, adapter_only: bool = False, register_as: str = "", timeout: float | None = None,
    ) -> MergeHandle:
        """Merge one adapter into the base (a standalone checkpoint under the merge root), or with
        adapter_only write the adapter's own files there (register_as: and register them)."""
        request = _core.merge_request(adapter_id, output_dir, overwrite, max_shard_bytes, verify, adapter_only, register_as)
        return MergeHandle(self, self._start_merge(request, timeout))

    @_translated
    def combine(
        self, adapters: Sequence[tuple[str, float]], output_dir: str, *, method: str = "svd", adapter_only: bool = False,
        register_as: str = "", svd_rank: int = 0, svd_clamp: float = 0.0, density: float = 0.0,
        majority_sign_method: str = "total", seed: int = 0, overwrite: bool = False, max_shard_bytes: int = 0,
        verify: bool = False, timeout: float | None = None,
    ) -> MergeHandle:
        """A weighted combination of adapters ((adapter_id, weight), ...), as peft's
        add_weighted_adapter makes it (method: linear, cat, svd, ties, ties_svd, dare_linear,
        dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd),
        merged into the base, or with adapter_only written as a LoRA (register_as: and
        registered under that id, to be served)."""
        request = _convert.combine_request(
            adapters, output_dir, method=method, adapter_only=adapter_only, register_as=register_as, svd_rank=svd_rank,
            svd_clamp=svd_clamp, density=density, majority_sign_method=majority_sign_method, seed=seed,
            overwrite=overwrite, max_shard_bytes=max_shard_bytes, verify=verify,
        )
        return MergeHandle(self, self._start_merge(request, timeout))

    def _start_merge(self, request, timeout: float | None):
        operation = self._stub.Merge(request, timeout=self._deadline(timeout))
        if self._router is not None:  # progress and result go to the replica that runs the merge
            self._router.remember(operation.name, _core.merge_routing_key(request))
        return operation

    @_translated
    @_translated
    def tokenize(self, *, timeout: float | None = None, **kwargs) -> types.Tokens:
        """The token ids of prompt= or messages= (with tools=, chat_template_kwargs=; with
        adapter_id=, its own chat template when it ships one), as generate would feed them,
        and the most tokens one request may hold."""
        response = self._stub.Tokenize(_convert.tokenize_request(**kwargs), timeout=self._deadline(timeout))
        return types.Tokens(list(response.token_ids), response.max_context)

    def server_info(self, *, timeout: float | None = None) -> types.ServerInfo:
        response = self._stub.GetServerInfo(loramux_service_pb2.GetServerInfoRequest(), timeout=self._deadline(timeout))
        return _convert.server_info(response)
