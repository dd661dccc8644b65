"""Streaming a Hugging Face decoder checkpoint: read tensor by tensor, build and write one block at a time."""
