"""Engines hand shards to workers and own progress, retries and shutdown; they never touch
pixels or tensors. `local` runs one process per device on this machine."""
