"""③ The event log: a protocol, a memory and a Redis implementation; keys.py spells every key."""
