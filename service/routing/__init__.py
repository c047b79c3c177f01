"""Router-as-LoRA: constrained decisions among registered adapters, with confidence and fallback."""
