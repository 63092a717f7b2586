"""Shared fakes speaking the real protocols: chat completions, batch APIs, object storage."""
