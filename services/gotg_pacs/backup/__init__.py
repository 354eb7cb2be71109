"""Backups of the appliance with borgmatic and borg: what is backed up, where, and what a backup
holds (the question a cleanup must ask before it deletes anything)."""
