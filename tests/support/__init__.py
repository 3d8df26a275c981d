"""Fakes, servers and factories the tests share (type-checked by mypy)."""
