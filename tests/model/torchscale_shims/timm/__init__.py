"""Test-only stand-in for timm (see ../README.md)."""
