"""Schedules (heartbeats): agents that run on a cron cadence (docs/schedules.md)."""
