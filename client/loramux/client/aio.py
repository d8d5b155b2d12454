"""The asyncio client: the same calls as Client, awaited."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc

from loramux.client import _convert, _core, types
from loramux.client._auth import key_header, resolve_api_key, resolve_tenant, tenant_header
from loramux.client._headers import HeaderStub, aio_header_interceptors
from loramux.client._routing import AffinityRouter, channel_options, wants_affinity
from loramux.client.errors import from_rpc_error
from loramux.v1 import adapter_pb2, loramux_service_pb2, loramux_service_pb2_grpc


def _translated(method):
    @functools.wraps(method)
    async def call(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    return call


class AsyncMergeHandle:
    def __init__(self, client: AsyncClient, operation: operations_pb2.Operation):
        self._client = client
        self._op = operation

    @property
    def name(self) -> str:
        return self._op.name

    @_translated
    async def progress(self) -> types.MergeProgress:
        self._op = await self._client._operations.GetOperation(
            operations_pb2.GetOperationRequest(name=self.name), timeout=self._client.timeout
        )
        return _convert.merge_progress(self._op)

    @_translated
    async def result(self, timeout: float | None = None) -> types.MergeResult:
        self._op = await _core.drive_async(_core.wait_merge(self._op, timeout), self._client._stubs)
        return _convert.merge_result(self._op)

    @_translated
    async def cancel(self) -> None:
        """Stop the merge at its next tensor; it ends with CANCELLED and writes nothing."""
        await self._client._operations.CancelOperation(operations_pb2.CancelOperationRequest(name=self.name),
                                                       timeout=self._client.timeout)

    @_translated
    async def delete(self) -> None:
        """Forget the finished merge's operation on the server (FAILED_PRECONDITION while it runs)."""
        await self._client._operations.DeleteOperation(operations_pb2.DeleteOperationRequest(name=self.name),
                                                       timeout=self._client.timeout)


class AsyncClient:
    """asyncio loramux client; `async with AsyncClient(target) as client: ...`.

    Calls are traced like the blocking Client's (OpenTelemetry's asyncio client interceptors;
    `tracer_provider` or the global one). A `channel` you pass is used as is: give it the
    interceptors yourself if you want its calls traced."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        channel: grpc.aio.Channel | None = None,
        options: list[tuple[str, object]] | None = None,
        tracer_provider=None,
        api_key: str | None = None,
        affinity: bool | None = None,
        tenant: str | None = None,
    ):
        """`api_key`: sent as `authorization: Bearer <key>` on every call (default: the
        LORAMUX_API_KEY environment variable), on a `channel` given too, as the blocking
        Client does; `tenant` as the blocking Client's (`x-loramux-tenant`, LORAMUX_TENANT)."""
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        self._router = None  # the affinity router, when affinity is on
        api_key = resolve_api_key(api_key)
        tenant = resolve_tenant(tenant)
        given = channel is not None
        if channel is None:
            creds = _convert.channel_credentials(tls, root_certificates, private_key, certificate_chain)
            interceptors = list(aio_client_interceptors(tracer_provider=tracer_provider))
            if api_key:
                interceptors = aio_header_interceptors(key_header(api_key)) + interceptors
            if tenant:
                interceptors = aio_header_interceptors(tenant_header(tenant)) + interceptors
            if wants_affinity(target) if affinity is None else affinity:  # as the blocking Client
                options = channel_options(options)
                self._router = AffinityRouter(api_key)
                interceptors = aio_header_interceptors(self._router.header_for) + interceptors
            channel = (
                grpc.aio.secure_channel(target, creds, options, interceptors=interceptors)
                if creds
                else grpc.aio.insecure_channel(target, options, interceptors=interceptors)
            )
        self._channel = channel
        self.timeout = timeout
        self._stub = loramux_service_pb2_grpc.LoramuxStub(channel)
        self._operations = operations_pb2_grpc.OperationsStub(channel)
        for wanted, header_for in ((api_key, key_header), (tenant, tenant_header)):
            if given and wanted:  # a channel made elsewhere takes no interceptor: the header rides on each call
                header = header_for(wanted)(None)
                self._stub, self._operations = HeaderStub(self._stub, header), HeaderStub(self._operations, header)

    @property
    def _stubs(self) -> dict[str, object]:
        return {"loramux": self._stub, "operations": self._operations}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    @_translated
    async def generate(self, *, timeout: float | None = None, **kwargs) -> types.GenerateResult:
        response = await self._stub.Generate(_convert.generate_request(**kwargs), timeout=self._deadline(timeout))
        return _convert.generate_result(response)

    async def generate_stream(self, *, timeout: float | None = None, **kwargs) -> AsyncIterator[types.StreamChunk]:
        call = self._stub.GenerateStream(_convert.generate_request(**kwargs), timeout=self._deadline(timeout))
        try:
            async for chunk in call:
                yield _convert.stream_chunk(chunk)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    @_translated
    async def list_operations(self, *, timeout: float | None = None) -> list[types.MergeProgress]:
        found, token = [], ""
        while True:
            page = await self._operations.ListOperations(
                operations_pb2.ListOperationsRequest(page_size=1000, page_token=token), timeout=self._deadline(timeout))
            found += [_convert.merge_progress(op) for op in page.operations]
            token = page.next_page_token
            if not token:
                return found

    @_translated
    async def operation(self, name: str, *, timeout: float | None = None) -> AsyncMergeHandle:
        op = await self._operations.GetOperation(operations_pb2.GetOperationRequest(name=name),
                                                 timeout=self._deadline(timeout))
        return AsyncMergeHandle(self, op)

    @_translated
    async def load_adapter(
        self, adapter_id: str, *, source: str, revision: str = "", pin: bool = False, warm: bool = False,
        replace: bool = False, timeout: float | None = None,
    ) -> types.AdapterInfo:
        request = _core.load_adapter_request(adapter_id, source, revision, pin, warm, replace)
        return _convert.adapter_info(await self._stub.LoadAdapter(request, timeout=self._deadline(timeout)))

    @_translated
    async def unload_adapter(self, adapter_id: str, *, timeout: float | None = None) -> None:
        await self._stub.UnloadAdapter(adapter_pb2.UnloadAdapterRequest(adapter_id=adapter_id), timeout=self._deadline(timeout))

    @_translated
    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> types.AdapterInfo:
        response = await self._stub.GetAdapter(adapter_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=self._deadline(timeout))
        return _convert.adapter_info(response)

    @_translated
    async def list_adapters(self, *, page_size: int = 0, timeout: float | None = None) -> list[types.AdapterInfo]:
        return await _core.drive_async(_core.list_adapters(page_size, self._deadline(timeout)), self._stubs)

    @_translated
    async def merge(
        self, adapter_id: str, output_dir: str, *, overwrite: bool = False, max_shard_bytes: int = 0,
        verify: bool = False, adapter_only: bool = False, register_as: str = "", timeout: float | None = None,
    ) -> AsyncMergeHandle:
        """Merge one adapter into the base (a standalone checkpoint under the merge root), or with
        adapter_only write the adapter's own files there (register_as: and register them)."""
        request = _core.merge_request(adapter_id, output_dir, overwrite, max_shard_bytes, verify, adapter_only, register_as)
        return AsyncMergeHandle(self, await self._start_merge(request, timeout))

    @_translated
    async def combine(
        self, adapters: Sequence[tuple[str, float]], output_dir: str, *, method: str = "svd", adapter_only: bool = False,
        register_as: str = "", svd_rank: int = 0, svd_clamp: float = 0.0, density: float = 0.0,
        majority_sign_method: str = "total", seed: int = 0, overwrite: bool = False, max_shard_bytes: int = 0,
        verify: bool = False, timeout: float | None = None,
    ) -> AsyncMergeHandle:
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
        return AsyncMergeHandle(self, await self._start_merge(request, timeout))

    async def _start_merge(self, request, timeout: float | None):
        operation = await self._stub.Merge(request, timeout=self._deadline(timeout))
        if self._router is not None:  # progress and result go to the replica that runs the merge
            self._router.remember(operation.name, _core.merge_routing_key(request))
        return operation

    @_translated
    @_translated
    async def tokenize(self, *, timeout: float | None = None, **kwargs) -> types.Tokens:
        """The token ids of prompt= or messages= (with tools=, chat_template_kwargs=; with
        adapter_id=, its own chat template when it ships one), as generate would feed them,
        and the most tokens one request may hold."""
        response = await self._stub.Tokenize(_convert.tokenize_request(**kwargs), timeout=self._deadline(timeout))
        return types.Tokens(list(response.token_ids), response.max_context)

    async def server_info(self, *, timeout: float | None = None) -> types.ServerInfo:
        response = await self._stub.GetServerInfo(loramux_service_pb2.GetServerInfoRequest(), timeout=self._deadline(timeout))
        return _convert.server_info(response)
