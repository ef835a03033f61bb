"""A2A push notifications: configs stored with their task's run, delivered durably."""
