"""The OpenAI-compatible HTTP front door (`--http-port`), over the engine's facade."""
