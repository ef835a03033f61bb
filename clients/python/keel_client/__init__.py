"""keel_client: a small asyncio client for Keel whose event streams resume by themselves.

- ``KeelClient``: the connection, unary helpers, handles on runs, threads
  (conversations: ``create_thread``, ``send`` a turn, ``thread_messages``),
  background tasks (``get_task``, ``list_tasks``, ``cancel_task``,
  ``retry_task``; ``until_idle=True`` makes a run wait for its tasks), goals
  (``goal=pb.Goal(...)`` on ``stream``, ``send`` and ``start_run``) and
  schedules (``create_schedule``, ``update_schedule``, ``pause_schedule``,
  ``trigger_schedule``, ``list_schedule_runs``, ...; ``list_runs(schedule_id=...)``).
- ``RunHandle``: one run's events, yielded exactly once and in order across
  dropped connections (reconnect on UNAVAILABLE, resume at ``next_offset``
  with the ``incarnation`` of the store that wrote the events it holds).
- ``ScheduleChanges``: the keyword arguments of ``update_schedule``.
- ``Reconnect``: a record of one reconnect, for logs and demos.
- ``StreamContractError``: the server broke the stream contract (a gap).
- ``LogRolledBack``: the run's store lost events a handle already received
  (it came back with an older state); read the run again from ``diverged_at``.
- ``keel_client.decisions``: the Decision messages of approve, deny and answer.
- ``Backoff``: the capped exponential backoff with jitter between reconnects.

``keel_client.sync`` has the same client for blocking code (a plain ``for``
over a run's events), running this one on a private event loop.
"""

from keel_client.backoff import Backoff
from keel_client.client import KeelClient, ScheduleChanges
from keel_client.errors import LogRolledBack, StreamContractError
from keel_client.handle import Reconnect, RunHandle

__all__ = [
    "Backoff",
    "KeelClient",
    "LogRolledBack",
    "Reconnect",
    "RunHandle",
    "ScheduleChanges",
    "StreamContractError",
]
