"""Offline doubles: deterministic models and backends for tests."""
