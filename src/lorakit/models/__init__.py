"""Base models: the lorakit model cache (aliases, .gguf conversion) and loading models and tokenizers."""
