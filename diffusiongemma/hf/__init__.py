"""What `transformers` users know: loading and saving checkpoints, the tokenizer, the processor (text and
images), streamers, and random checkpoints for tests and benchmarks."""
