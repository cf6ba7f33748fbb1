"""Shared test fixtures and helpers (imported by the conftests)."""
