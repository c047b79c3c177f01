"""loramux service: one base model, many LoRA experts, and a router that is itself a LoRA."""
