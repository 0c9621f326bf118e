"""Training: the LoRA fine-tuning recipe, callbacks, verified saving."""
