"""`lorakit serve`: an OpenAI-compatible API for one base model and many LoRA adapters."""
