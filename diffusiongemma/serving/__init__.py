"""The OpenAI-compatible server and the scheduler that drives the engine for many requests at once."""
