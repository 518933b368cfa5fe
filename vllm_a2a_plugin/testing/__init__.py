"""Helpers for tests and engine runs that need no network (tiny local models)."""
