"""Event-store configuration: recorders that also claim request ids, in memory and in PostgreSQL."""
