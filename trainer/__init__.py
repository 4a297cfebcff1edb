"""Per-task LoRA training (PEFT + transformers). Heavy imports live in the modules that need them."""
