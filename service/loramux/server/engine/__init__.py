"""The engine: owns the model and the accelerator, on one worker thread."""
