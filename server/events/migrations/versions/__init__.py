"""The schema's revisions, in order: 0001 (the event log), then the other stores'."""
