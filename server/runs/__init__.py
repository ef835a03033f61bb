"""② The executor: run lifecycle, batched event writing and cancellation."""
