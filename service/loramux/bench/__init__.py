"""`make bench`: loramux against the base model and peft-based serving, side by side in one run."""
