"""Persistent state: the journal and the run lock."""
