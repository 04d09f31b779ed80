"""Backends: how the gateway speaks to each kind of upstream."""
