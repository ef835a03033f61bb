/**
 * The plumbing of one call of a retry loop: its AbortSignal (with the stall
 * watchdog) and the wait between two attempts.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { ClientClosedError } from "./errors.js";

/**
 * The AbortSignal of one call: aborted by the caller's signal, by the client's
 * close(), by the stall watchdog, or by dispose() once the call is over.
 */
export class CallControl {
  readonly #controller = new AbortController();
  readonly #sources: AbortSignal[];
  readonly #stallTimeoutMs: number;
  #timer: ReturnType<typeof setTimeout> | undefined;
  stalled = false;

  constructor(signal: AbortSignal | undefined, closed: AbortSignal, stallTimeoutMs: number) {
    this.#sources = signal === undefined ? [closed] : [signal, closed];
    this.#stallTimeoutMs = stallTimeoutMs;
    for (const source of this.#sources) {
      source.addEventListener("abort", this.#abort);
    }
    if (this.#sources.some((source) => source.aborted)) {
      this.#controller.abort();
    }
    this.touch();
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  /** A message arrived: restart the stall watchdog. */
  touch(): void {
    if (this.#stallTimeoutMs <= 0) {
      return;
    }
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.stalled = true;
      this.#controller.abort(this.stallError());
    }, this.#stallTimeoutMs);
  }

  /** The reader holds an event: stop the stall watchdog until the next touch(). */
  pause(): void {
    clearTimeout(this.#timer);
  }

  stallError(): ConnectError {
    return new ConnectError(
      `no message from the server for ${this.#stallTimeoutMs} ms (heartbeats included)`,
      Code.Unavailable,
    );
  }

  dispose(): void {
    clearTimeout(this.#timer);
    for (const source of this.#sources) {
      source.removeEventListener("abort", this.#abort);
    }
    this.#controller.abort();
  }

  readonly #abort = (): void => {
    this.#controller.abort();
  };
}

/** Waits `ms`, unless `signal` (throws its reason) or `closed` (throws ClientClosedError) fires first. */
export function sleep(
  ms: number,
  signal: AbortSignal | undefined,
  closed: AbortSignal,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const stop = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", stop);
      closed.removeEventListener("abort", stop);
      if (signal?.aborted) {
        reject(signal.reason);
      } else if (closed.aborted) {
        reject(new ClientClosedError());
      } else {
        resolve();
      }
    };
    const timer = setTimeout(stop, ms);
    signal?.addEventListener("abort", stop);
    closed.addEventListener("abort", stop);
    if (signal?.aborted || closed.aborted) {
      stop();
    }
  });
}
