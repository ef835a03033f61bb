"""Background tasks: slow tools run off the agent loop (docs/tasks.md)."""

from server.tasks.context import TaskContext, task_context
from server.tasks.records import background

__all__ = ["TaskContext", "background", "task_context"]
