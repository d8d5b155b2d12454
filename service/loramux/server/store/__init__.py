"""The shared store: registrations, operations and heartbeats in `--state-dir` or object storage, read as hostile."""
