"""Adapters on disk: the PEFT format, every check, the library, zip archives, blends, resolving and exports."""
