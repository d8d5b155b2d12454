"""Adapters: where they come from, how they are checked, and the tiers that hold them."""
