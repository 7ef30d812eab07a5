"""What to do when a worker dies on a shard, whichever engine ran it: retry it one image at a
time, blame the image being decoded when a careful attempt dies, and give up on a shard
that keeps failing with no image to blame."""

from __future__ import annotations

from imgfeat.pipeline.device_worker import Task

MAX_ATTEMPTS = 3  # deaths on one shard with no image to blame


class RetryPolicy:
    def __init__(self, max_attempts: int = MAX_ATTEMPTS):
        self.max_attempts = max_attempts
        self.failed: dict[int, str] = {}
        self._attempts: dict[int, int] = {}

    def after_death(self, task: Task, position: int, reason: str) -> Task | None:
        """The task to run next for this shard, or None when it is given up."""
        if task.careful and position >= 0:
            blame = f"worker process died while decoding this image ({reason})"
            return Task(task.index, True, task.excluded + ((position, blame),))
        attempts = self._attempts[task.index] = self._attempts.get(task.index, 0) + 1
        if attempts >= self.max_attempts:
            self.failed[task.index] = reason
            return None
        return Task(task.index, careful=True, excluded=task.excluded)
