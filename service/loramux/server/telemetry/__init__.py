"""Tracing, metrics and logs: OpenTelemetry set up once at start-up from the settings."""
