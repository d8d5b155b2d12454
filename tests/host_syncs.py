"""Watching for host synchronisation on the CPU: operators whose result the host must wait
for on a GPU (a value read back, or an output shape that depends on the data)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncs(TorchDispatchMode):
    """Records every syncing operator run inside it (`seen`). `Tensor.tolist()` reads memory
    without a dispatched operator, so it escapes this watch."""

    SYNCING = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique", "bincount",
               "repeat_interleave", "equal", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if any(name == s or name.startswith(s + "_") for s in self.SYNCING):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))
