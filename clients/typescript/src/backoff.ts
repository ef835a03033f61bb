/**
 * Capped exponential backoff with jitter, after gRPC's connection-backoff spec.
 *
 * The n-th reconnect in a row (from 0) waits about
 * `min(initialMs * multiplier ** n, maxMs)`, spread by +/- `jitter` so that
 * many clients dropped by the same server restart do not come back in
 * lockstep. The same numbers as the Python client's `keel_client.Backoff`.
 */
export interface BackoffOptions {
  /** The first delay of a row of reconnects. Default 50 ms. */
  initialMs?: number;
  /** The largest delay. Default 2000 ms. */
  maxMs?: number;
  /** Growth factor from one delay to the next. Default 2. */
  multiplier?: number;
  /** Each delay is scaled by a random factor in [1 - jitter, 1 + jitter]. Default 0.2. */
  jitter?: number;
}

export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;
  readonly multiplier: number;
  readonly jitter: number;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 50;
    this.maxMs = options.maxMs ?? 2000;
    this.multiplier = options.multiplier ?? 2;
    this.jitter = options.jitter ?? 0.2;
    if (!(this.initialMs >= 0 && this.maxMs >= this.initialMs)) {
      throw new RangeError("backoff needs 0 <= initialMs <= maxMs");
    }
    if (!(this.multiplier >= 1 && this.jitter >= 0 && this.jitter < 1)) {
      throw new RangeError("backoff needs multiplier >= 1 and 0 <= jitter < 1");
    }
  }

  /** The delay before reconnect number `attempt` (0 for the first of a row), in ms. */
  delayMs(attempt: number, random: () => number = Math.random): number {
    // Cap the exponent: 2 ** 10_000 is Infinity.
    const cappedMs = Math.min(
      this.initialMs * this.multiplier ** Math.min(attempt, 64),
      this.maxMs,
    );
    return cappedMs * (1 - this.jitter + 2 * this.jitter * random());
  }
}
