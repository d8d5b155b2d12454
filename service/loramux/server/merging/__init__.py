"""Merging adapters (or weighted combinations) into the base's checkpoint files, streamed."""
