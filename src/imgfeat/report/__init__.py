"""What a person sees of a run: progress, the closing summary, per-stage timing."""
