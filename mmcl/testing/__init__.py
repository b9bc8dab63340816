"""Helpers for testing code that uses mmcl (an offline Hub stand-in)."""
