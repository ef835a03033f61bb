"""④ Observe: catch-up from the log, then live, with bounded per-observer queues."""
