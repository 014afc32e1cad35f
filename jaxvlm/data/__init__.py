"""Data: the example format, the built-in gym, JSONL datasets and the grain pipeline."""
