"""Versioned migrations of the system schema ``_quiver``: ``NNNN_name.sql`` files applied
in order, each in its own transaction, each recorded in ``_quiver.schema_migrations``.

A new feature adds a new file with the next free number; an applied file is never edited.
"""
