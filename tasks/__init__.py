"""The battery of task suites; importing this package registers the built-in suites."""

from tasks.base import TASKS, PromptBatch, TaskSuite
from tasks.ioi import suite as _ioi  # noqa: F401  (registers "ioi")
from tasks.wmdp_bio import suite as _wmdp_bio  # noqa: F401  (registers "wmdp_bio")
from tasks.tpp import suite as _tpp  # noqa: F401  (registers "tpp")
from tasks.refusal import suite as _refusal  # noqa: F401  (registers "refusal")

__all__ = ["TASKS", "PromptBatch", "TaskSuite"]
