"""loramux client SDK: `from loramux.client import Client, AsyncClient`.

Installs without torch (the package's base dependencies are the client's).
"""

from loramux.client.aio import AsyncClient, AsyncMergeHandle
from loramux.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from loramux.client.sync import Client, MergeHandle
from loramux.client.types import (
    AdapterInfo,
    Completion,
    GenerateResult,
    MergeProgress,
    MergeResult,
    PromptScores,
    ServerInfo,
    StreamChunk,
    Timings,
    Tokens,
    Usage,
)

__all__ = [
    "Aborted", "AdapterInfo", "AlreadyExists", "AsyncClient", "AsyncMergeHandle", "Cancelled", "Client", "Completion", "DeadlineExceeded",
    "FailedPrecondition", "GenerateResult", "InternalError", "InvalidArgument", "LoramuxError", "MergeHandle",
    "MergeProgress", "MergeResult", "NotFound", "PromptScores", "PermissionDenied", "ResourceExhausted", "ServerInfo", "StreamChunk",
    "Timings", "Tokens", "Unauthenticated", "Unavailable", "Unimplemented", "Usage",
]
