"""The loop: the Trainer and what it calls (options, plan, precision, guard, checkpointing, callbacks)."""
