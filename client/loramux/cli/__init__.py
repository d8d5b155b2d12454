"""The `loramux` command line."""
