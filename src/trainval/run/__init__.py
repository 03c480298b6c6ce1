"""The run folder: its claim and lock, the protection of its outputs, its summary.json."""
