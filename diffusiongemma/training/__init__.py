"""Training and fine-tuning: the block-diffusion objective, data, LoRA, and the training loop."""
