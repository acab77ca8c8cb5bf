"""oisp's built-in sinks: ``jsonl`` (files), ``stdout`` (a readable line or JSON per event), ``memory``."""
