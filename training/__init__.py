"""loramux training: routing datasets, LoRA SFT, evaluation and registration of adapters."""
