"""Names shared by every layer: tenants and adapter ids (one alphabet and length)."""

from __future__ import annotations

from loramux.server.errors import InvalidRequest

ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_ID_LENGTH = 128


def validate_adapter_id(adapter_id: str, field: str = "adapter_id", reason: str = "ADAPTER_ID_INVALID") -> None:
    """Ids (and tenant names, `reason` TENANT_INVALID) are 1-128 characters of [A-Za-z0-9._-]."""
    if not adapter_id:
        raise InvalidRequest(f"{field} is required", field=field, reason=reason)
    if len(adapter_id) > MAX_ID_LENGTH or not set(adapter_id) <= ID_CHARS or adapter_id[0] in "-.":
        shown = adapter_id if len(adapter_id) <= 40 else adapter_id[:37] + "..."
        raise InvalidRequest(
            f"{field} {shown!r} must be 1-{MAX_ID_LENGTH} characters of letters, digits, '-', '_' and '.', "
            "not starting with '-' or '.'",
            field=field,
            reason=reason,
        )


def refuse_model_name(adapter_id: str, model_names: tuple[str, ...], field: str = "adapter_id") -> None:
    """An adapter may not take the served model's name: the OpenAI API's `model` names the
    base model by it, so such an adapter could never be called there."""
    if adapter_id in model_names:
        raise InvalidRequest(f"{field} {adapter_id!r} is the served model's name, which names the base model; choose "
                             "another", field=field, reason="ADAPTER_ID_RESERVED")
