"""Test-only stand-in for fairscale (see ../README.md)."""
