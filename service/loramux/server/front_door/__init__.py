"""What the front doors (grpc_api/, http_api/) share: bounded per-tenant pools for their
blocking engine calls."""
