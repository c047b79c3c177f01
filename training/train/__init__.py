"""Training: chats to token ids, LoRA SFT with TRL, the run's length from the data, validation with
early stopping, confidence calibration, and the adapter's `loramux.json`."""
