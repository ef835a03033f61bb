"""The Temporal executor: each Keel run is a Temporal workflow executed by worker processes."""
