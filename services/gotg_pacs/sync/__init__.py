"""Clinic-side sync to HQ: the outbox, the changes feed that fills it, and the `pacs sync` CLI."""
