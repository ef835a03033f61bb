/**
 * RunHandle: one run's event stream, resumed across dropped connections.
 *
 * A handle remembers where its reader is (`nextOffset`: the index of the next
 * event it has not yielded), once the first snapshot named it, the run's id,
 * and the incarnation of the store that wrote the events it holds. Every
 * reconnect asks for exactly that offset, so the events a reader sees are 0,
 * 1, 2, ... exactly once, whatever happened in between; and it sends that
 * incarnation, so a store that came back with an older state (and now gives
 * some of those indices to other events) fails the reconnect with
 * LogRolledBack instead of mixing two histories. It is the loop
 * docs/clients.md describes, and the twin of the Python client's
 * `keel_client.RunHandle`.
 */
import { ConnectError, type Client, type Code } from "@connectrpc/connect";
import type { Backoff } from "./backoff.js";
import { CallControl, sleep } from "./calls.js";
import { ClientClosedError, LogRolledBack, StreamContractError } from "./errors.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type {
  AgentEvent,
  AgentService,
  DecisionSchema,
  Heartbeat,
  ObserveResponse,
  ResumeRequest,
  ResumeResponse,
  RunSnapshot,
  StreamRequest,
  StreamResponse,
} from "./gen/keel/v1/agent_service_pb.js";

export type AgentServiceClient = Client<typeof AgentService>;

/** The RPC a handle sends to (re)open its stream. */
export type StreamRpc = "Stream" | "Observe" | "Resume";

/** One reconnect of a handle after its stream failed with UNAVAILABLE (or stalled). */
export interface Reconnect {
  /** 1 for the first reconnect of a row without a new event, then 2, 3, ... */
  attempt: number;
  /** The offset the new request resumes at: the handle's nextOffset. */
  offset: bigint;
  /** The RPC the handle sends again: Observe once the run's id and offset are known. */
  rpc: StreamRpc;
  /** How long the handle waits before sending it. */
  delayMs: number;
  /** The status of the failure that caused it (UNAVAILABLE for a broken connection). */
  code: Code;
  /** The failure's message. */
  message: string;
}

export type OnReconnect = (reconnect: Reconnect) => void;

export interface EventsOptions {
  /**
   * The index of the first event to yield (inclusive). Default: the handle's
   * `nextOffset` (0 for a new handle), so iterating `events()` again
   * continues where the last iteration stopped.
   *
   * One past `nextOffset` forgets the handle's `incarnation`: the handle
   * holds no event just below it, so it claims nothing there (the next
   * snapshot tells the incarnation again). One at or below `nextOffset` keeps
   * it: the handle does hold the events below it, written in the history that
   * incarnation names, so re-reading from there still checks they are the
   * log's (and re-reading from a LogRolledBack's `divergedAt`, or from 0,
   * passes that check).
   */
  fromOffset?: bigint | number;
  /**
   * Stops the iteration: the open call is cancelled and the generator throws
   * `signal.reason`. The run goes on in the server.
   */
  signal?: AbortSignal;
}

/** What a handle needs from its KeelClient. */
export interface HandleContext {
  /** Sends one decision with Resume for a run; the stream's snapshot (see KeelClient.approve). */
  decide(runId: string, decision: DecisionInit, options: DecideOptions): Promise<RunSnapshot>;
  /** The generated client; throws ClientClosedError once the KeelClient is closed. */
  client(): AgentServiceClient;
  /** Aborted when the KeelClient is closed. */
  closed: AbortSignal;
  backoff: Backoff;
  /** Reconnects in a row without a new event before giving up; undefined: no limit. */
  maxReconnects: number | undefined;
  /** Reconnect when a stream delivers no message (heartbeats included) for this long; 0: never. */
  stallTimeoutMs: number;
  /** Whether a failure is worth a reconnect (UNAVAILABLE, as the transport reports it). */
  isUnavailable: (error: unknown) => boolean;
}

/** How a handle's first request is made. */
export type HandleStart =
  | { rpc: "Stream"; request: StreamRequest }
  | { rpc: "Observe"; runId: string; stopAtSuspend: boolean }
  | { rpc: "Resume"; request: ResumeRequest };

/** One decision of a Resume, as the generated Decision message's init shape. */
export type DecisionInit = MessageInitShape<typeof DecisionSchema>;

/** A JSON value, as JSON.stringify accepts it. */
export type Json = string | number | boolean | null | Json[] | { [key: string]: Json };

/** Options of approve(), deny() and answer(). */
export interface DecideOptions {
  /** An idempotency key: the same Resume sent twice has one effect. Default: a random UUID. */
  requestId?: string;
  /** Stops waiting (and retrying); the decision may or may not have arrived. */
  signal?: AbortSignal;
}

type Response = StreamResponse | ObserveResponse | ResumeResponse;

/**
 * A run's event stream that survives dropped connections.
 *
 * Get one from `KeelClient.stream()` (starts a run), `KeelClient.run()` (an
 * existing run) or `KeelClient.resume()` (answers a suspended run) and
 * iterate `events()`.
 */
export class RunHandle {
  /**
   * The run's id. For a `stream()` handle it is undefined until the first
   * snapshot arrives; a Stream that drops before it is sent again with the
   * same request_id (idempotent: the server attaches to the same run).
   */
  runId: string | undefined;
  /** The index of the next event `events()` yields: the last yielded index + 1. */
  nextOffset: bigint;
  /** The RunSnapshot of the latest (re)connection. */
  snapshot: RunSnapshot | undefined;
  /** The latest Heartbeat; its nextOffset never exceeds the handle's. */
  lastHeartbeat: Heartbeat | undefined;
  /** Every reconnect so far. */
  readonly reconnects: Reconnect[] = [];
  /** Called with each reconnect as it happens (before its backoff delay). */
  onReconnect: OnReconnect | undefined;

  /**
   * The incarnation of the store that wrote the events this handle holds, as
   * the stream said: the snapshot's `run.incarnation`, replaced by a later
   * heartbeat's (one at the handle's nextOffset) when the store changed. Sent
   * with every Observe (`ObserveRequest.incarnation`) once the handle holds
   * an event, so the server can tell they are still the log's. "" until the
   * first snapshot, and for a store that never goes back.
   */
  get incarnation(): string {
    return this.#incarnation;
  }

  readonly #context: HandleContext;
  readonly #start: HandleStart;
  // False only for a Resume handle before its first event (or fromOffset):
  // the Resume stream starts at the first event after the suspension, an
  // index the client cannot know in advance.
  #offsetKnown: boolean;
  // A Resume is sent again (same request_id: one effect) until one of them
  // reached its snapshot, i.e. the server has the decisions.
  #resumeDelivered = false;
  #iterating = false;
  #incarnation = "";

  constructor(context: HandleContext, start: HandleStart, onReconnect?: OnReconnect) {
    this.#context = context;
    this.#start = start;
    this.runId =
      start.rpc === "Stream"
        ? undefined
        : start.rpc === "Observe"
          ? start.runId
          : start.request.runId;
    this.nextOffset = 0n;
    this.#offsetKnown = start.rpc !== "Resume";
    this.onReconnect = onReconnect;
  }

  /**
   * Yields the run's events from `fromOffset` exactly once and in index
   * order, following the run live, until the server ends the stream with OK
   * after the terminal event (finish, error or abort).
   *
   * Lazy: no request is sent until the first `next()`. Breaking out of a
   * `for await` cancels the call; the run goes on in the server, and
   * `events()` may be iterated again later to continue.
   *
   * 1. Open Observe(runId, nextOffset, incarnation); or Stream(request)
   *    while the run's id is unknown, Resume(request) while the decisions may
   *    not have arrived or the offset is unknown (both idempotent by
   *    request_id).
   * 2. Check the snapshot comes first; take the run's id and incarnation
   *    from it (and a new incarnation from a heartbeat at nextOffset).
   * 3. For each event: index < nextOffset is a duplicate (drop it);
   *    index > nextOffset is a gap (throw StreamContractError); otherwise
   *    advance nextOffset and yield it.
   * 4. On UNAVAILABLE (or a connection that broke, or no message for
   *    stallTimeoutMs) wait with capped exponential backoff and jitter, and go
   *    to 1. After maxReconnects reconnects in a row that brought no new
   *    event, throw the last error. FAILED_PRECONDITION with reason
   *    LOG_ROLLED_BACK throws LogRolledBack (the store lost events the handle
   *    holds; never retried). Any other status is thrown as is (a
   *    ConnectError).
   */
  async *events(options: EventsOptions = {}): AsyncGenerator<AgentEvent, void, undefined> {
    if (this.#iterating) {
      throw new Error("this RunHandle's events() is already being iterated");
    }
    const { signal } = options;
    const from = options.fromOffset === undefined ? undefined : BigInt(options.fromOffset);
    if (from !== undefined && from < 0n) {
      throw new RangeError(`fromOffset must not be negative, got ${from}`);
    }
    this.#iterating = true;
    try {
      if (from !== undefined) {
        if (!this.#offsetKnown || from > this.nextOffset) {
          this.#incarnation = ""; // no claim about events the handle never held
        }
        this.nextOffset = from;
        this.#offsetKnown = true;
      }
      let failures = 0; // reconnects in a row that brought no new event
      for (;;) {
        this.#checkNotStopped(signal);
        const offsetBefore = this.nextOffset;
        const rpc = this.#nextRpc();
        const call = new CallControl(signal, this.#context.closed, this.#context.stallTimeoutMs);
        let reconnect: Reconnect;
        try {
          let hasSnapshot = false;
          for await (const message of this.#open(rpc, call.signal)) {
            call.touch();
            hasSnapshot = this.#acceptControl(message, hasSnapshot, rpc);
            if (message.kind.case === "events") {
              for (const event of message.kind.value.events) {
                if (this.#acceptEvent(event)) {
                  call.pause(); // a slow reader is not a silent server
                  yield event;
                  call.touch();
                }
              }
            }
          }
          return;
        } catch (caught) {
          this.#checkNotStopped(signal);
          const error = call.stalled ? call.stallError() : caught;
          const rolledBack = LogRolledBack.from(error, {
            runId: this.runId ?? "",
            offset: this.nextOffset,
            incarnation: this.#claimedIncarnation(),
          });
          if (rolledBack !== undefined) {
            throw rolledBack;
          }
          if (!this.#context.isUnavailable(error)) {
            throw error;
          }
          if (this.nextOffset > offsetBefore) {
            failures = 0;
          }
          const { maxReconnects } = this.#context;
          if (maxReconnects !== undefined && failures >= maxReconnects) {
            throw error;
          }
          const connectError = ConnectError.from(error);
          reconnect = {
            attempt: failures + 1,
            offset: this.nextOffset,
            rpc: this.#nextRpc(),
            delayMs: this.#context.backoff.delayMs(failures),
            code: connectError.code,
            message: connectError.rawMessage,
          };
          failures += 1;
        } finally {
          call.dispose();
        }
        this.reconnects.push(reconnect);
        this.onReconnect?.(reconnect);
        await sleep(reconnect.delayMs, signal, this.#context.closed);
      }
    } finally {
      this.#iterating = false;
    }
  }

  /**
   * Approves a tool call of this run that waits for approval (a
   * `tool_call_approval` event); call it from inside the events() loop and
   * the loop goes on with the resumed run. See KeelClient.approve().
   */
  approve(
    toolCallId: string,
    options: DecideOptions & { overrideArgs?: { [key: string]: Json } } = {},
  ): Promise<RunSnapshot> {
    return this.#decide(approval(toolCallId, options.overrideArgs), options);
  }

  /** Denies a tool call of this run that waits for approval; the model sees `message`. */
  deny(
    toolCallId: string,
    options: DecideOptions & { message?: string } = {},
  ): Promise<RunSnapshot> {
    const message = options.message ?? "";
    return this.#decide({ toolCallId, decision: { case: "deny", value: { message } } }, options);
  }

  /** Gives the result (any JSON value) of a deferred tool call of this run (`tool_call_suspended`). */
  answer(toolCallId: string, result: Json, options: DecideOptions = {}): Promise<RunSnapshot> {
    return this.#decide(answer(toolCallId, result), options);
  }

  async #decide(decision: DecisionInit, options: DecideOptions): Promise<RunSnapshot> {
    if (this.runId === undefined) {
      throw new Error("the run's id is not known yet: iterate events() first");
    }
    return this.#context.decide(this.runId, decision, options);
  }

  /** Step 1: which RPC (re)opens the stream. */
  #nextRpc(): StreamRpc {
    if (this.runId === undefined) {
      return "Stream";
    }
    if (this.#start.rpc === "Resume" && !(this.#resumeDelivered && this.#offsetKnown)) {
      return "Resume";
    }
    return "Observe";
  }

  #open(rpc: StreamRpc, signal: AbortSignal): AsyncIterable<Response> {
    const client = this.#context.client();
    const start = this.#start;
    if (rpc === "Stream" && start.rpc === "Stream") {
      return client.stream(start.request, { signal });
    }
    if (rpc === "Resume" && start.rpc === "Resume") {
      return client.resume(start.request, { signal });
    }
    if (rpc === "Observe" && this.runId !== undefined) {
      const stopAtSuspend = this.#start.rpc === "Observe" && this.#start.stopAtSuspend;
      const incarnation = this.#claimedIncarnation();
      return client.observe(
        { runId: this.runId, offset: this.nextOffset, stopAtSuspend, incarnation },
        { signal },
      );
    }
    throw new Error(`cannot open ${rpc} for a handle started with ${start.rpc}`); // unreachable
  }

  /** The incarnation of the last event the handle holds (nextOffset - 1); "" (no check) while it holds none. */
  #claimedIncarnation(): string {
    return this.#offsetKnown && this.nextOffset > 0n ? this.#incarnation : "";
  }

  /** Step 2 and heartbeats, for one message; returns whether the call has its snapshot. */
  #acceptControl(message: Response, hasSnapshot: boolean, rpc: StreamRpc): boolean {
    const kind = message.kind;
    if (kind.case === "snapshot") {
      const runId = kind.value.run?.runId ?? "";
      if (runId === "") {
        throw new StreamContractError("the stream's snapshot names no run");
      }
      if (this.runId !== undefined && runId !== this.runId) {
        throw new StreamContractError(`expected a snapshot of run ${this.runId}, got ${runId}`);
      }
      this.runId = runId;
      this.snapshot = kind.value;
      // The incarnation that wrote the run's latest events: the history the
      // events this stream delivers (and those the handle holds, which the
      // server checked when the stream opened) belong to.
      this.#incarnation = kind.value.run?.incarnation ?? "";
      if (rpc === "Resume") {
        this.#resumeDelivered = true;
      }
      return true;
    }
    if (!hasSnapshot) {
      throw new StreamContractError(`the stream sent ${String(kind.case)} before its snapshot`);
    }
    if (kind.case === "heartbeat") {
      this.lastHeartbeat = kind.value;
      // A heartbeat names the next index this stream delivers; past ours
      // means the stream skipped events this handle never saw.
      if (this.#offsetKnown && kind.value.nextOffset > this.nextOffset) {
        throw new StreamContractError(
          `run ${this.runId}: heartbeat at ${kind.value.nextOffset} but nextOffset is ${this.nextOffset}`,
        );
      }
      // The incarnation that wrote the events delivered so far: the handle's,
      // once the stream has delivered all the handle holds.
      if (
        this.#offsetKnown &&
        kind.value.incarnation !== "" &&
        kind.value.nextOffset === this.nextOffset
      ) {
        this.#incarnation = kind.value.incarnation;
      }
    }
    // Other kinds (a newer server's additions) are not this client's business.
    return true;
  }

  /** Step 3 for one event: whether to yield it. */
  #acceptEvent(event: AgentEvent): boolean {
    if (!this.#offsetKnown) {
      this.nextOffset = event.index; // a Resume stream's first event sets the baseline
      this.#offsetKnown = true;
    }
    if (event.index < this.nextOffset) {
      return false; // a duplicate, already yielded before a reconnect
    }
    if (event.index > this.nextOffset) {
      throw new StreamContractError(
        `run ${this.runId}: expected event ${this.nextOffset}, got ${event.index}`,
      );
    }
    this.nextOffset += 1n; // before yielding: a reader may stop at this event
    return true;
  }

  #checkNotStopped(signal: AbortSignal | undefined): void {
    if (signal?.aborted) {
      throw signal.reason;
    }
    if (this.#context.closed.aborted) {
      throw new ClientClosedError();
    }
  }
}

/** The Decision that approves a tool call, with arguments that replace the model's if given. */
export function approval(toolCallId: string, overrideArgs?: { [key: string]: Json }): DecisionInit {
  if (
    overrideArgs !== undefined &&
    (typeof overrideArgs !== "object" || overrideArgs === null || Array.isArray(overrideArgs))
  ) {
    throw new TypeError("overrideArgs must be a JSON object");
  }
  const overrideArgsJson = overrideArgs === undefined ? "" : JSON.stringify(overrideArgs);
  return { toolCallId, decision: { case: "approve", value: { overrideArgsJson } } };
}

/** The Decision that gives a deferred tool call its result. */
export function answer(toolCallId: string, result: Json): DecisionInit {
  const resultJson = JSON.stringify(result);
  if (resultJson === undefined) {
    throw new TypeError("result must be a JSON value");
  }
  return { toolCallId, decision: { case: "resultJson", value: resultJson } };
}
