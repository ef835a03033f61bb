/**
 * KeelClientBase: the KeelClient of every entry point without its transport:
 * every helper, and event streams that resume by themselves (RunHandle). It
 * imports nothing of Node and nothing of the browser: the Node entry point
 * (client.ts, "@keel/client") gives it gRPC over HTTP/2, the browser one
 * (web.ts, "@keel/client/web") Connect or gRPC-Web over fetch.
 *
 *     const client = new KeelClient("127.0.0.1:50051"); // in a browser: "http://host:http-port"
 *     const handle = client.stream("scripted", '{"steps": [{"text": 5}]}');
 *     for await (const event of handle.events()) { ... }
 *     client.close();
 *
 * The unary helpers return the proto messages of keel.v1 and throw
 * ConnectError as Connect does; only the event streams (and the delivery of
 * a Resume's decisions) retry, and only on UNAVAILABLE.
 *
 * Threads (conversations) hold the message history their runs share:
 *
 *     const thread = await client.createThread({ resourceId: "user-42" });
 *     for (const input of ["hi", "and then?"]) {
 *       const handle = client.sendMessage(thread.threadId, "assistant", input);
 *       for await (const event of handle.events()) { ... }
 *     }
 *     const { messages } = await client.listThreadMessages(thread.threadId);
 *
 * A background tool call makes a task that runs off the agent loop; the
 * run's stream carries its TaskUpdates, and `untilIdle` keeps the run open
 * until its tasks ended, giving each result to the model:
 *
 *     const handle = client.stream("scripted", input, { untilIdle: true });
 *     for await (const event of handle.events()) {
 *       if (event.payload.case === "task") { ... } // QUEUED, STARTED, ..., COMPLETED
 *     }
 *     const task = await client.getTask(taskId);
 *
 * A goal makes a run go on, attempt after attempt, until a judge agent is
 * satisfied (`goalEvaluated` events, then `finish` with goalMet); a schedule
 * starts runs of an agent on a cron cadence:
 *
 *     const goal = { objective: "say DONE", judgeAgentId: "judge", maxAttempts: 3 };
 *     for await (const event of client.stream("assistant", input, { goal }).events()) { ... }
 *     const schedule = await client.createSchedule("assistant", "0 9 * * 1-5", input, {
 *       timezone: "Europe/Paris",
 *     });
 *     await client.updateSchedule(schedule.scheduleId, { cron: "0 8 * * 1-5" });
 *     const { run } = await client.triggerSchedule(schedule.scheduleId); // a run now
 *     const { runs } = await client.listRuns({ scheduleId: schedule.scheduleId });
 */
import {
  createClient,
  type CallOptions,
  type StreamResponse,
  type Transport,
} from "@connectrpc/connect";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { durationFromMs } from "@bufbuild/protobuf/wkt";
import { Backoff } from "./backoff.js";
import { CallControl, sleep } from "./calls.js";
import { ClientClosedError, StreamContractError } from "./errors.js";
import {
  AgentService,
  type GoalSchema,
  ResumeRequestSchema,
  ScheduleOverlapPolicy,
  ScheduleSchema,
  ScheduleThreadMode,
  StreamRequestSchema,
  ThreadBusyPolicy,
  type Agent,
  type AgentEvent,
  type ListRunsResponse,
  type ListScheduleRunsResponse,
  type ListSchedulesResponse,
  type ListTasksResponse,
  type ListThreadMessagesResponse,
  type ListThreadsResponse,
  type ResumeRequest,
  type Run,
  type RunSnapshot,
  type RunState,
  type Schedule,
  type Task,
  type TaskStatus,
  type Thread,
  type TriggerScheduleResponse,
} from "./gen/keel/v1/agent_service_pb.js";
import {
  RunHandle,
  answer,
  approval,
  type AgentServiceClient,
  type DecideOptions,
  type DecisionInit,
  type EventsOptions,
  type HandleContext,
  type Json,
  type OnReconnect,
} from "./handle.js";

/** The options every KeelClient takes, in Node and in a browser. */
export interface KeelClientBaseOptions {
  /**
   * The transport to use instead of the entry point's default. The caller
   * owns a transport it passes in; close() does not close it.
   */
  transport?: Transport;
  /**
   * An API key, sent with every call as `authorization: Bearer <key>` (a
   * server started with a keys file, KEEL_API_KEYS_FILE, needs one; see
   * `python -m server keys add`). Also added to the calls of a transport
   * passed in. Default: none.
   */
  apiKey?: string;
  /** The first wait of a row of reconnects. Default 50 ms. */
  initialBackoffMs?: number;
  /** The longest wait between reconnects. Default 2000 ms. */
  maxBackoffMs?: number;
  /**
   * How many reconnects in a row without a new event a stream makes before
   * it throws the last UNAVAILABLE error. Default: no limit.
   */
  maxReconnects?: number;
  /**
   * Reconnect a stream that delivered no message for this long. Keel sends
   * heartbeats on quiet streams (every KEEL_HEARTBEAT_INTERVAL_S, 5 s by
   * default), so silence means a connection that died without telling
   * anyone. Keep it several heartbeat intervals long. Default 30000; 0
   * disables the watchdog.
   */
  stallTimeoutMs?: number;
}

/** What an entry point gives KeelClientBase: its transport and how to read its failures. */
export interface Connection {
  /** The transport of every call (the apiKey is added to it). */
  transport: Transport;
  /** Whether a failed call is worth a reconnect: the transport's "the server is unavailable". */
  isUnavailable: (error: unknown) => boolean;
  /** Closes what the entry point opened (its default transport's connections); called once. */
  close?: () => void;
}

/** Options of a handle on a run. */
export interface HandleOptions {
  /** Called with each reconnect of the handle's stream as it happens. */
  onReconnect?: OnReconnect;
}

/** Options of run() and observeRun(). */
export interface ObserveOptions extends HandleOptions {
  /**
   * End the stream right after a `suspended` event (or right after the
   * snapshot when the run is suspended at the offset asked for) instead of
   * following the run across its suspension: what an approval inbox wants.
   */
  stopAtSuspend?: boolean;
}

/** How a run sent to a thread treats a busy thread. */
export interface ThreadRunOptions {
  /**
   * What to do when the thread already has an active run (queued, running
   * or suspended): REJECT (the default: FAILED_PRECONDITION, reason
   * THREAD_BUSY, with the active run's id in the ErrorInfo metadata
   * `active_run_id`), ENQUEUE (wait in state QUEUED for the runs before it
   * to end), INTERRUPT (cancel the active run, whose prompt and completed
   * steps stay in the thread, then wait like ENQUEUE) or ROLLBACK (like
   * INTERRUPT, but none of the cancelled run's messages stay in the
   * thread). Ignored without a thread.
   */
  busyPolicy?: ThreadBusyPolicy;
}

/** Whether a run waits for its background tasks. */
export interface UntilIdleOptions {
  /**
   * Do not finish the run while background tasks it started are pending:
   * when the model is done the run stays RUNNING and waits, and each task's
   * result is given to the model as a new message, until the model is done
   * with no task pending; the stream carries every task's TaskUpdates up to
   * its end. Default false: the run finishes when the model is done and its
   * tasks go on by themselves (getTask() shows them).
   */
  untilIdle?: boolean;
}

/** A goal: `{ objective, judgeAgentId, maxAttempts }`, or a Goal message. */
export type GoalInit = MessageInitShape<typeof GoalSchema>;

/** The goal a run pursues. */
export interface GoalOptions {
  /**
   * Pursue this goal: after each attempt of the agent (the model is done,
   * and with untilIdle its tasks too), the goal's judge (`judgeAgentId`, an
   * agent of the server whose output is a verdict) decides whether
   * `objective` is met, a `goalEvaluated` event; if not, and attempts remain
   * (`maxAttempts`, 0 means 3), the run goes on with the judge's reason as a
   * new message, in the same run. The `finish` event's goalMet (and the
   * Run's) says whether the last verdict was satisfied. Default: the agent's
   * default goal, if it has one (listAgents()). A missing objective or
   * judge, a judge that is no verdict agent of the server, or maxAttempts
   * out of range is INVALID_ARGUMENT.
   */
  goal?: GoalInit;
}

/** Options of startRun(). */
export interface StartRunOptions extends ThreadRunOptions, UntilIdleOptions, GoalOptions {
  /**
   * An idempotency key (a UUID is best, at most 128 characters): requests
   * with the same request_id start one run (on a thread: one run of that
   * thread). For stream() the default is a random UUID, so the client's own
   * retries never start a second run; startRun() sends none unless given.
   */
  requestId?: string;
  /**
   * Make the run on this thread (see createThread()): it starts with the
   * thread's message history, and its own messages join the thread when it
   * ends. Default: a run on its own.
   */
  threadId?: string;
}

/** Options of stream(). */
export interface StartOptions extends HandleOptions, StartRunOptions {}

/** Options of sendMessage(). */
export interface SendMessageOptions
  extends HandleOptions, ThreadRunOptions, UntilIdleOptions, GoalOptions {
  /**
   * An idempotency key: requests with the same request_id start one run of
   * the thread. Default: a random UUID, so the handle's own retries never
   * start a second run.
   */
  requestId?: string;
}

/** Options of createThread(). */
export interface CreateThreadOptions {
  /**
   * The thread's id: 1 to 64 letters, digits, '_', '.' or '-', starting with
   * a letter or digit. Default: the server picks one (derived from
   * requestId, if given).
   */
  threadId?: string;
  /** Who the thread belongs to, e.g. a user id (at most 128 characters); listThreads() filters by it. */
  resourceId?: string;
  /** The caller's metadata: at most 64 entries, keys of 1 to 128 characters, values of at most 1024. */
  metadata?: { [key: string]: string };
  /**
   * An idempotency key: the same request sent again returns the same
   * thread. Default: none (createThread() does not retry by itself).
   */
  requestId?: string;
}

/** Filters and paging of listThreads(). */
export interface ListThreadsFilter {
  /** Only threads of this resource_id. */
  resourceId?: string;
  /** The most threads to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same resourceId). */
  pageToken?: string;
}

/** Paging of listThreadMessages(). */
export interface ListThreadMessagesOptions {
  /** The most messages to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same newestFirst). */
  pageToken?: string;
  /** Newest first instead of oldest first (a chat shows the latest page first). */
  newestFirst?: boolean;
}

/** Options of resume() and the decision helpers. */
export interface ResumeOptions extends HandleOptions {
  /** An idempotency key: the same Resume sent twice has one effect. Default: a random UUID. */
  requestId?: string;
}

/** Filters and paging of listRuns(). */
export interface ListRunsFilter {
  /** Only runs of this agent. */
  agentId?: string;
  /** Only runs in one of these states. */
  states?: RunState[];
  /** Only runs made on this thread. */
  threadId?: string;
  /** Only runs this schedule started. */
  scheduleId?: string;
  /** The most runs to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same filters). */
  pageToken?: string;
}

/** Filters and paging of listTasks(). */
export interface ListTasksFilter {
  /** Only tasks of this run. */
  runId?: string;
  /** Only tasks of this agent. */
  agentId?: string;
  /** Only tasks in one of these statuses (STARTED and RUNNING both mean running). */
  statuses?: TaskStatus[];
  /** The most tasks to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same filters). */
  pageToken?: string;
}

/** Options of createSchedule(). */
export interface CreateScheduleOptions {
  /** The IANA time zone the cron expression is read in, e.g. "America/New_York". Default UTC. */
  timezone?: string;
  /**
   * The schedule's id: 1 to 64 letters, digits, '_', '.' or '-', starting
   * with a letter or digit. Default: the server picks one (derived from
   * requestId, if given).
   */
  scheduleId?: string;
  /**
   * Where the firings' runs are made: THREADLESS (the default: each on a
   * fresh thread of its own) or THREADED (all on the schedule's one thread,
   * or on `threadId`, so the agent sees the earlier firings).
   */
  threadMode?: ScheduleThreadMode;
  /**
   * What a tick does while the previous firing's run is active: SKIP (the
   * default: record it SKIPPED), ENQUEUE (THREADED only: wait in the
   * thread's queue) or ALLOW (THREADLESS only: start beside it).
   */
  overlapPolicy?: ScheduleOverlapPolicy;
  /**
   * How late a tick missed while every server was down may still fire: 1 s
   * to 366 days. Default 365 days.
   */
  catchUpWindowMs?: number;
  /** Create the schedule paused: it fires no tick until resumed (triggerSchedule() still fires it). */
  paused?: boolean;
  /** An idempotency key: the same request sent again returns the same schedule. */
  requestId?: string;
  /** THREADED only: an existing thread for the firings. Default: the schedule's own thread. */
  threadId?: string;
  /** The goal every firing's run pursues (see GoalOptions). */
  goal?: GoalInit;
}

/**
 * The changes of updateSchedule(): each field given (not undefined) is
 * changed, the others stay; their names make the request's update_mask.
 */
export interface ScheduleChanges {
  agentId?: string;
  cron?: string;
  /** "" is UTC. */
  timezone?: string;
  input?: string;
  overlapPolicy?: ScheduleOverlapPolicy;
  /** null: the default (365 days). */
  catchUpWindowMs?: number | null;
  paused?: boolean;
  /** null: no goal any more. */
  goal?: GoalInit | null;
}

/** The update_mask path of each field of ScheduleChanges (the proto's names). */
const SCHEDULE_PATHS: { readonly [K in keyof Required<ScheduleChanges>]: string } = {
  agentId: "agent_id",
  cron: "cron",
  timezone: "timezone",
  input: "input",
  overlapPolicy: "overlap_policy",
  catchUpWindowMs: "catch_up_window",
  paused: "paused",
  goal: "goal",
};

/** Filters and paging of listSchedules(). */
export interface ListSchedulesFilter {
  /** Only schedules of this agent. */
  agentId?: string;
  /** The most schedules to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same agentId). */
  pageToken?: string;
}

/** Paging of listScheduleRuns(). */
export interface ListScheduleRunsOptions {
  /** The most firings to return: 0 means 50, larger values are capped at 1000. */
  pageSize?: number;
  /** The nextPageToken of the previous page (only valid with the same schedule). */
  pageToken?: string;
}

/**
 * A connection to one Keel server (or a load balancer in front of many),
 * whatever carries its calls: the KeelClient of "@keel/client" (Node, gRPC
 * over HTTP/2) and of "@keel/client/web" (browsers, Connect or gRPC-Web over
 * fetch) are this class with a default transport. close() cancels the open
 * streams and closes the entry point's connection; it is safe to call more
 * than once.
 */
export class KeelClientBase {
  readonly baseUrl: string;
  readonly #client: AgentServiceClient;
  readonly #closed = new AbortController();
  readonly #context: HandleContext;
  readonly #isUnavailable: (error: unknown) => boolean;
  readonly #disconnect: (() => void) | undefined;

  /**
   * `connect` is called once the options are checked, with the signal
   * close() aborts, and returns the transport to use (the caller's
   * `options.transport`, or the entry point's default).
   */
  protected constructor(
    baseUrl: string,
    options: KeelClientBaseOptions,
    connect: (closed: AbortSignal) => Connection,
  ) {
    this.baseUrl = baseUrl;
    const maxReconnects = options.maxReconnects;
    if (maxReconnects !== undefined && !(Number.isInteger(maxReconnects) && maxReconnects >= 0)) {
      throw new RangeError(`maxReconnects must be a non-negative integer, got ${maxReconnects}`);
    }
    const stallTimeoutMs = options.stallTimeoutMs ?? 30_000;
    if (!(stallTimeoutMs >= 0)) {
      throw new RangeError(`stallTimeoutMs must not be negative, got ${stallTimeoutMs}`);
    }
    const apiKey = options.apiKey;
    if (apiKey !== undefined && !/^[\x21-\x7e]+$/.test(apiKey)) {
      throw new TypeError("apiKey must be non-empty printable ASCII without spaces");
    }
    const closed = this.#closed.signal;
    const connection = connect(closed);
    this.#isUnavailable = connection.isUnavailable;
    this.#disconnect = connection.close;
    const transport =
      apiKey === undefined
        ? connection.transport
        : withHeader(connection.transport, "authorization", `Bearer ${apiKey}`);
    this.#client = createClient(AgentService, transport);
    this.#context = {
      decide: (runId, decision, decideOptions) => this.#decide(runId, decision, decideOptions),
      client: () => this.#live(),
      closed,
      backoff: new Backoff({ initialMs: options.initialBackoffMs, maxMs: options.maxBackoffMs }),
      maxReconnects,
      stallTimeoutMs,
      isUnavailable: connection.isUnavailable,
    };
  }

  /** Cancels the open calls and closes the default transport's connection. Safe to call twice. */
  close(): void {
    if (this.#closed.signal.aborted) {
      return;
    }
    this.#closed.abort(new ClientClosedError());
    this.#disconnect?.();
  }

  /** The generated Connect client, for calls the helpers do not cover. */
  get rpc(): AgentServiceClient {
    return this.#live();
  }

  #live(): AgentServiceClient {
    if (this.#closed.signal.aborted) {
      throw new ClientClosedError();
    }
    return this.#client;
  }

  // Streams.

  /**
   * A handle that starts a run with Stream on the first iteration of its
   * events(). The request_id (generated unless given) makes the handle's own
   * retries of a Stream that dropped before its snapshot start one run.
   *
   * With `threadId` the run is made on that thread; a run that waits for
   * the thread's turn (busyPolicy ENQUEUE, INTERRUPT or ROLLBACK) streams
   * its snapshot in state QUEUED, then heartbeats until it starts. REJECT
   * on a busy thread makes events() throw FAILED_PRECONDITION (THREAD_BUSY).
   *
   * With `untilIdle` the run waits for the background tasks it started
   * (their TaskUpdates are among its events) and the model sees each
   * result before the run finishes.
   *
   * With a `goal` the run goes on, attempt after attempt, until the goal's
   * judge is satisfied or no attempt is left: a `goalEvaluated` event after
   * each attempt, and `finish` says goalMet. A bad goal makes events()
   * throw INVALID_ARGUMENT.
   */
  stream(agentId: string, input: string, options: StartOptions = {}): RunHandle {
    const request = create(StreamRequestSchema, {
      agentId,
      input,
      requestId: options.requestId ?? randomId(),
      threadId: options.threadId ?? "",
      busyPolicy: options.busyPolicy ?? ThreadBusyPolicy.UNSPECIFIED,
      untilIdle: options.untilIdle ?? false,
      goal: options.goal,
    });
    return new RunHandle(this.#context, { rpc: "Stream", request }, options.onReconnect);
  }

  /**
   * Sends `input` to a thread: a handle that starts a run of `agentId` on
   * the thread on the first iteration of its events(), like stream() with
   * `threadId` (the run starts with the thread's history, and its messages
   * join the thread when it ends). The request_id (generated unless given)
   * makes the handle's own retries start one run.
   *
   * A busy thread (a run of it has not ended) follows `busyPolicy`; with
   * the default, REJECT, events() throws ConnectError FAILED_PRECONDITION
   * whose errorInfo() has reason THREAD_BUSY and metadata active_run_id.
   * NOT_FOUND (THREAD_NOT_FOUND) for an unknown thread. `untilIdle` and
   * `goal` as for stream(): the turn waits for its background tasks, and
   * pursues the goal.
   */
  sendMessage(
    threadId: string,
    agentId: string,
    input: string,
    options: SendMessageOptions = {},
  ): RunHandle {
    return this.stream(agentId, input, { ...options, threadId });
  }

  /** A handle on an existing run, observed from offset 0 unless events() is told otherwise. */
  run(runId: string, options: ObserveOptions = {}): RunHandle {
    const stopAtSuspend = options.stopAtSuspend ?? false;
    return new RunHandle(
      this.#context,
      { rpc: "Observe", runId, stopAtSuspend },
      options.onReconnect,
    );
  }

  /**
   * The events of an existing run from `fromOffset` (default 0), exactly once
   * and in order, across dropped connections and server restarts, until the
   * run's terminal event. Aborting `signal` cancels the call and makes the
   * generator throw the signal's reason; resume later from the last index
   * seen + 1.
   */
  observeRun(
    runId: string,
    options: EventsOptions & ObserveOptions = {},
  ): AsyncGenerator<AgentEvent, void, undefined> {
    return this.run(runId, options).events(options);
  }

  /**
   * A handle that sends Resume(runId, decisions) on the first iteration of
   * its events() and streams the run from the first event after its
   * suspension (pass fromOffset to events() to dedupe against what you have
   * seen already). Until the server acknowledged the decisions with the
   * stream's snapshot, a dropped Resume is sent again with the same
   * request_id (one effect); after that the handle resumes with Observe.
   *
   * Errors are thrown as they come (ConnectError): FAILED_PRECONDITION
   * (RUN_NOT_SUSPENDED, INTERRUPT_RESOLVED) for a run that does not wait for
   * these decisions, ABORTED (CONCURRENT_MODIFICATION) when another Resume
   * won a race, INVALID_ARGUMENT for a tool_call_id that names no pending
   * interrupt, ALREADY_EXISTS (REQUEST_ID_REUSED).
   */
  resume(runId: string, decisions: DecisionInit[], options: ResumeOptions = {}): RunHandle {
    const request = resumeRequest(runId, decisions, options.requestId);
    return new RunHandle(this.#context, { rpc: "Resume", request }, options.onReconnect);
  }

  /**
   * Approves a tool call that waits for approval (a `tool_call_approval`
   * event) and resolves with the Resume stream's snapshot once the server
   * has the decision; observers of the run see it go on. `overrideArgs`, if
   * given, is a JSON object that replaces the arguments the model chose.
   */
  approve(
    runId: string,
    toolCallId: string,
    options: DecideOptions & { overrideArgs?: { [key: string]: Json } } = {},
  ): Promise<RunSnapshot> {
    return this.#decide(runId, approval(toolCallId, options.overrideArgs), options);
  }

  /** Denies a tool call that waits for approval; the model sees `message`. See approve(). */
  deny(
    runId: string,
    toolCallId: string,
    options: DecideOptions & { message?: string } = {},
  ): Promise<RunSnapshot> {
    const message = options.message ?? "";
    return this.#decide(
      runId,
      { toolCallId, decision: { case: "deny", value: { message } } },
      options,
    );
  }

  /** Gives the result of a deferred tool call (a `tool_call_suspended` event). See approve(). */
  answer(
    runId: string,
    toolCallId: string,
    result: Json,
    options: DecideOptions = {},
  ): Promise<RunSnapshot> {
    return this.#decide(runId, answer(toolCallId, result), options);
  }

  /**
   * Sends one decision with Resume and returns the stream's snapshot, which
   * the server sends once it has the decision; then cancels the stream (the
   * run goes on). A Resume that fails with UNAVAILABLE is sent again, with
   * the same request_id, after the usual backoff.
   */
  async #decide(
    runId: string,
    decision: DecisionInit,
    options: DecideOptions,
  ): Promise<RunSnapshot> {
    const request = resumeRequest(runId, [decision], options.requestId);
    const { backoff, maxReconnects, closed, stallTimeoutMs } = this.#context;
    for (let failures = 0; ; failures += 1) {
      const call = new CallControl(options.signal, closed, stallTimeoutMs);
      try {
        for await (const message of this.#live().resume(request, { signal: call.signal })) {
          if (message.kind.case !== "snapshot") {
            throw new StreamContractError(
              `the Resume stream of run ${runId} sent ${String(message.kind.case)} before its snapshot`,
            );
          }
          return message.kind.value; // leaving the loop cancels the call
        }
        throw new StreamContractError(`the Resume stream of run ${runId} ended without a snapshot`);
      } catch (caught) {
        if (options.signal?.aborted) {
          throw options.signal.reason;
        }
        if (closed.aborted) {
          throw new ClientClosedError();
        }
        const error = call.stalled ? call.stallError() : caught;
        if (
          !this.#isUnavailable(error) ||
          (maxReconnects !== undefined && failures >= maxReconnects)
        ) {
          throw error;
        }
      } finally {
        call.dispose();
      }
      await sleep(backoff.delayMs(failures), options.signal, closed);
    }
  }

  // Unary calls.

  /**
   * Starts a run without streaming it; the same requestId returns the same
   * run. With `threadId` the run is made on that thread (see stream());
   * on a busy thread it is returned QUEUED unless busyPolicy is REJECT.
   * `untilIdle` and `goal` as for stream() (a bad goal is INVALID_ARGUMENT).
   */
  async startRun(
    agentId: string,
    input: string,
    options: StartRunOptions = {},
    call?: CallOptions,
  ): Promise<Run> {
    const response = await this.#live().startRun(
      {
        agentId,
        input,
        requestId: options.requestId ?? "",
        threadId: options.threadId ?? "",
        busyPolicy: options.busyPolicy ?? ThreadBusyPolicy.UNSPECIFIED,
        untilIdle: options.untilIdle ?? false,
        goal: options.goal,
      },
      call,
    );
    return required(response.run, "StartRun", "run");
  }

  /** A run's current state. */
  async getRun(runId: string, call?: CallOptions): Promise<Run> {
    const response = await this.#live().getRun({ runId }, call);
    return required(response.run, "GetRun", "run");
  }

  /**
   * One page of runs, newest first; pass nextPageToken back as pageToken for
   * the next. Filters: agentId, states, threadId (a thread's runs) and
   * scheduleId (the runs a schedule started).
   */
  listRuns(filter: ListRunsFilter = {}, call?: CallOptions): Promise<ListRunsResponse> {
    return this.#live().listRuns(
      {
        agentId: filter.agentId ?? "",
        states: filter.states ?? [],
        threadId: filter.threadId ?? "",
        scheduleId: filter.scheduleId ?? "",
        pageSize: filter.pageSize ?? 0,
        pageToken: filter.pageToken ?? "",
      },
      call,
    );
  }

  /** Cancels a run that has not ended; an ended run is returned unchanged. */
  async cancelRun(
    runId: string,
    options: { reason?: string } = {},
    call?: CallOptions,
  ): Promise<Run> {
    const response = await this.#live().cancelRun({ runId, reason: options.reason ?? "" }, call);
    return required(response.run, "CancelRun", "run");
  }

  /** The agents this server can run, sorted by agentId. */
  async listAgents(call?: CallOptions): Promise<Agent[]> {
    const response = await this.#live().listAgents({}, call);
    return response.agents;
  }

  // Background tasks: calls of background tools, run off their run's agent loop.

  /**
   * A background task: its run, tool, arguments, status, attempt, progress,
   * and result or error. NOT_FOUND (TASK_NOT_FOUND) for an unknown task or
   * one whose run's retention time passed; INVALID_ARGUMENT for a malformed
   * id (a task's id is its run's id, a dot and 16 hex digits).
   */
  async getTask(taskId: string, call?: CallOptions): Promise<Task> {
    const response = await this.#live().getTask({ taskId }, call);
    return required(response.task, "GetTask", "task");
  }

  /** One page of background tasks, newest first; pass nextPageToken back as pageToken for the next. */
  listTasks(filter: ListTasksFilter = {}, call?: CallOptions): Promise<ListTasksResponse> {
    return this.#live().listTasks(
      {
        runId: filter.runId ?? "",
        agentId: filter.agentId ?? "",
        statuses: filter.statuses ?? [],
        pageSize: filter.pageSize ?? 0,
        pageToken: filter.pageToken ?? "",
      },
      call,
    );
  }

  /**
   * Cancels a task that has not ended and returns it as the server recorded
   * the cancellation: a waiting task ends CANCELLED at once, a running one as
   * soon as its runner hears of it (the task returned may still be STARTED).
   * Its run, if still open, gets a TaskUpdate CANCELLED with `reason`. An
   * ended task is returned unchanged.
   */
  async cancelTask(
    taskId: string,
    options: { reason?: string } = {},
    call?: CallOptions,
  ): Promise<Task> {
    const response = await this.#live().cancelTask({ taskId, reason: options.reason ?? "" }, call);
    return required(response.task, "CancelTask", "task");
  }

  /**
   * Runs a FAILED or CANCELLED task again, with the same id and arguments
   * and a fresh retry budget; resolves with the task, QUEUED again.
   * FAILED_PRECONDITION (TASK_NOT_RETRYABLE, metadata status) for a task
   * that is waiting, running or completed.
   */
  async retryTask(taskId: string, call?: CallOptions): Promise<Task> {
    const response = await this.#live().retryTask({ taskId }, call);
    return required(response.task, "RetryTask", "task");
  }

  // Threads.

  /**
   * Creates a thread: a conversation whose runs share one message history.
   * The same requestId sent again returns the same thread. ALREADY_EXISTS
   * (THREAD_ALREADY_EXISTS) for a threadId that is taken.
   */
  async createThread(options: CreateThreadOptions = {}, call?: CallOptions): Promise<Thread> {
    const response = await this.#live().createThread(
      {
        threadId: options.threadId ?? "",
        resourceId: options.resourceId ?? "",
        metadata: options.metadata ?? {},
        requestId: options.requestId ?? "",
      },
      call,
    );
    return required(response.thread, "CreateThread", "thread");
  }

  /**
   * A thread: its owner, metadata, active and queued runs, and number of
   * messages. NOT_FOUND (THREAD_NOT_FOUND) for an unknown or deleted thread.
   */
  async getThread(threadId: string, call?: CallOptions): Promise<Thread> {
    const response = await this.#live().getThread({ threadId }, call);
    return required(response.thread, "GetThread", "thread");
  }

  /** One page of threads, newest first; pass nextPageToken back as pageToken for the next. */
  listThreads(filter: ListThreadsFilter = {}, call?: CallOptions): Promise<ListThreadsResponse> {
    return this.#live().listThreads(
      {
        resourceId: filter.resourceId ?? "",
        pageSize: filter.pageSize ?? 0,
        pageToken: filter.pageToken ?? "",
      },
      call,
    );
  }

  /**
   * Deletes a thread and its message history; the runs made on it stay.
   * FAILED_PRECONDITION (THREAD_BUSY) while a run of the thread is active
   * or queued: cancel it first.
   */
  async deleteThread(threadId: string, call?: CallOptions): Promise<void> {
    await this.#live().deleteThread({ threadId }, call);
  }

  /**
   * One page of a thread's messages, oldest first unless `newestFirst`, each
   * with the run that produced it, its kind (REQUEST to the model, RESPONSE
   * from it) and its typed parts. A run's messages join the thread when the
   * run ends.
   */
  listThreadMessages(
    threadId: string,
    options: ListThreadMessagesOptions = {},
    call?: CallOptions,
  ): Promise<ListThreadMessagesResponse> {
    return this.#live().listThreadMessages(
      {
        threadId,
        pageSize: options.pageSize ?? 0,
        pageToken: options.pageToken ?? "",
        newestFirst: options.newestFirst ?? false,
      },
      call,
    );
  }

  // Schedules: an agent run on a cron cadence.

  /**
   * Creates a schedule: each tick of `cron` starts a run of `agentId` with
   * `input`; resolves with the schedule as stored, with its next fire times.
   * `cron` has five fields (minute hour day-of-month month day-of-week), six
   * with a leading seconds field, or is @hourly, @daily, @weekly, @monthly
   * or @yearly, read in `options.timezone` (default UTC).
   *
   * INVALID_ARGUMENT (BadRequest field violations) for an unknown agent, a
   * malformed cron expression, an unknown time zone, a catch-up window out
   * of range, a bad goal or an overlap policy the thread mode does not
   * allow; ALREADY_EXISTS (SCHEDULE_ALREADY_EXISTS) for a scheduleId that is
   * taken, (REQUEST_ID_REUSED) for a requestId sent before with other
   * fields; NOT_FOUND (THREAD_NOT_FOUND) for an unknown threadId.
   */
  async createSchedule(
    agentId: string,
    cron: string,
    input: string,
    options: CreateScheduleOptions = {},
    call?: CallOptions,
  ): Promise<Schedule> {
    const window = options.catchUpWindowMs;
    const response = await this.#live().createSchedule(
      {
        agentId,
        cron,
        input,
        timezone: options.timezone ?? "",
        scheduleId: options.scheduleId ?? "",
        threadMode: options.threadMode ?? ScheduleThreadMode.UNSPECIFIED,
        overlapPolicy: options.overlapPolicy ?? ScheduleOverlapPolicy.UNSPECIFIED,
        catchUpWindow: window === undefined ? undefined : durationFromMs(window),
        paused: options.paused ?? false,
        requestId: options.requestId ?? "",
        threadId: options.threadId ?? "",
        goal: options.goal,
      },
      call,
    );
    return required(response.schedule, "CreateSchedule", "schedule");
  }

  /**
   * A schedule with its next fire times (none while paused) and its 10 most
   * recent firings, newest first. NOT_FOUND (SCHEDULE_NOT_FOUND) for an
   * unknown schedule; INVALID_ARGUMENT for a malformed id.
   */
  async getSchedule(scheduleId: string, call?: CallOptions): Promise<Schedule> {
    const response = await this.#live().getSchedule({ scheduleId }, call);
    return required(response.schedule, "GetSchedule", "schedule");
  }

  /**
   * One page of schedules, newest first, without their recent firings; pass
   * nextPageToken back as pageToken for the next.
   */
  listSchedules(
    filter: ListSchedulesFilter = {},
    call?: CallOptions,
  ): Promise<ListSchedulesResponse> {
    return this.#live().listSchedules(
      {
        agentId: filter.agentId ?? "",
        pageSize: filter.pageSize ?? 0,
        pageToken: filter.pageToken ?? "",
      },
      call,
    );
  }

  /**
   * Changes the fields of a schedule that `changes` gives, and only those;
   * resolves with the schedule as changed:
   *
   *     await client.updateSchedule(id, { paused: true });
   *     await client.updateSchedule(id, { cron: "@hourly", input: "..." });
   *     await client.updateSchedule(id, { goal: null }); // no goal any more
   *
   * A new cron or time zone, and an unpause, start the cadence again from
   * now (the ticks before are neither fired nor missed). NOT_FOUND
   * (SCHEDULE_NOT_FOUND) for an unknown schedule; INVALID_ARGUMENT for no
   * change at all or a bad value. A field ScheduleChanges does not name
   * throws TypeError before anything is sent.
   */
  async updateSchedule(
    scheduleId: string,
    changes: ScheduleChanges,
    call?: CallOptions,
  ): Promise<Schedule> {
    const paths: string[] = [];
    for (const [key, value] of Object.entries(changes)) {
      if (!Object.hasOwn(SCHEDULE_PATHS, key)) {
        const known = Object.keys(SCHEDULE_PATHS).join(", ");
        throw new TypeError(`updateSchedule() cannot change ${key}; it changes ${known}`);
      }
      if (value !== undefined) {
        paths.push(SCHEDULE_PATHS[key as keyof ScheduleChanges]);
      }
    }
    // Fields left undefined (or null: cleared) stay unset in the message.
    const window = changes.catchUpWindowMs;
    const schedule = create(ScheduleSchema, {
      scheduleId,
      agentId: changes.agentId,
      cron: changes.cron,
      timezone: changes.timezone,
      input: changes.input,
      overlapPolicy: changes.overlapPolicy,
      catchUpWindow: window == null ? undefined : durationFromMs(window),
      paused: changes.paused,
      goal: changes.goal ?? undefined,
    });
    const response = await this.#live().updateSchedule({ schedule, updateMask: { paths } }, call);
    return required(response.schedule, "UpdateSchedule", "schedule");
  }

  /**
   * Pauses a schedule: it fires no tick until resumed (triggerSchedule()
   * still fires it). `updateSchedule(scheduleId, { paused: true })`.
   */
  pauseSchedule(scheduleId: string, call?: CallOptions): Promise<Schedule> {
    return this.updateSchedule(scheduleId, { paused: true }, call);
  }

  /**
   * Unpauses a schedule; its cadence starts again from now (the ticks it
   * slept through are not fired). `updateSchedule(scheduleId, { paused: false })`.
   */
  resumeSchedule(scheduleId: string, call?: CallOptions): Promise<Schedule> {
    return this.updateSchedule(scheduleId, { paused: false }, call);
  }

  /**
   * Deletes a schedule and its firing history; no tick fires after it. The
   * runs it started, and its thread, stay. NOT_FOUND (SCHEDULE_NOT_FOUND)
   * for an unknown schedule.
   */
  async deleteSchedule(scheduleId: string, call?: CallOptions): Promise<void> {
    await this.#live().deleteSchedule({ scheduleId }, call);
  }

  /**
   * Fires a schedule now, paused or not, whatever its overlap policy;
   * resolves with the run it started (`run`) and the firing recorded
   * (`firing`, outcome TRIGGERED). The cadence does not change. The same
   * requestId sent again returns the run the first request started.
   * NOT_FOUND (SCHEDULE_NOT_FOUND) for an unknown schedule; INVALID_ARGUMENT
   * for a malformed requestId or a schedule whose agent this server does
   * not run.
   */
  triggerSchedule(
    scheduleId: string,
    options: { requestId?: string } = {},
    call?: CallOptions,
  ): Promise<TriggerScheduleResponse> {
    return this.#live().triggerSchedule({ scheduleId, requestId: options.requestId ?? "" }, call);
  }

  /**
   * One page of a schedule's firings, newest first (a schedule keeps its
   * 100 most recent): a run STARTED or TRIGGERED (runId), a tick SKIPPED or
   * MISSED, or a FAILED start (detail); pass nextPageToken back as pageToken
   * for the next. NOT_FOUND (SCHEDULE_NOT_FOUND) for an unknown schedule.
   */
  listScheduleRuns(
    scheduleId: string,
    options: ListScheduleRunsOptions = {},
    call?: CallOptions,
  ): Promise<ListScheduleRunsResponse> {
    return this.#live().listScheduleRuns(
      { scheduleId, pageSize: options.pageSize ?? 0, pageToken: options.pageToken ?? "" },
      call,
    );
  }
}

function resumeRequest(
  runId: string,
  decisions: DecisionInit[],
  requestId: string | undefined,
): ResumeRequest {
  return create(ResumeRequestSchema, { runId, decisions, requestId: requestId ?? randomId() });
}

function required<T>(value: T | undefined, rpc: string, what: string): T {
  if (value === undefined) {
    throw new StreamContractError(`${rpc} answered without a ${what}`);
  }
  return value;
}

/**
 * A random (version 4) UUID. Browsers have crypto.randomUUID only in secure
 * contexts (https, localhost); getRandomValues everywhere.
 */
function randomId(): string {
  const { crypto } = globalThis;
  if (typeof crypto.randomUUID === "function") {
    return crypto.randomUUID();
  }
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6]! & 0x0f) | 0x40;
  bytes[8] = (bytes[8]! & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** `transport` with `name: value` set on the headers of every call. */
function withHeader(transport: Transport, name: string, value: string): Transport {
  const headers = (init: ConstructorParameters<typeof Headers>[0]): Headers => {
    const out = new Headers(init);
    out.set(name, value);
    return out;
  };
  return {
    unary: (method, signal, timeoutMs, header, input, contextValues) =>
      transport.unary(method, signal, timeoutMs, headers(header), input, contextValues),
    stream: (method, signal, timeoutMs, header, input, contextValues) =>
      transport.stream(method, signal, timeoutMs, headers(header), input, contextValues),
  };
}

/**
 * `transport` whose calls are also cancelled by `closed` (close()), unary
 * calls and raw streams of `rpc` included, for transports with no
 * connection of their own for close() to shut (fetch). A call cancelled so
 * fails with ClientClosedError; the other failures are `mapError(error)`.
 */
export function cancelledOnClose(
  transport: Transport,
  closed: AbortSignal,
  mapError: (error: unknown) => unknown = (error) => error,
): Transport {
  return {
    async unary(method, signal, timeoutMs, header, input, contextValues) {
      const link = linkSignals(signal, closed);
      try {
        return await transport.unary(method, link.signal, timeoutMs, header, input, contextValues);
      } catch (error) {
        throw closed.aborted && !signal?.aborted ? new ClientClosedError() : mapError(error);
      } finally {
        link.dispose();
      }
    },
    async stream(method, signal, timeoutMs, header, input, contextValues) {
      const link = linkSignals(signal, closed);
      let response: StreamResponse<typeof method.input, typeof method.output>;
      try {
        response = await transport.stream(
          method,
          link.signal,
          timeoutMs,
          header,
          input,
          contextValues,
        );
      } catch (error) {
        link.dispose();
        throw closed.aborted && !signal?.aborted ? new ClientClosedError() : mapError(error);
      }
      const messages = response.message;
      async function* relay() {
        try {
          yield* messages;
        } catch (error) {
          throw closed.aborted && !signal?.aborted ? new ClientClosedError() : mapError(error);
        } finally {
          link.dispose();
        }
      }
      return { ...response, message: relay() };
    },
  };
}

/** A signal aborted when `signal` or `closed` is; dispose() detaches it. */
function linkSignals(
  signal: AbortSignal | undefined,
  closed: AbortSignal,
): { signal: AbortSignal; dispose: () => void } {
  const controller = new AbortController();
  const sources = signal === undefined ? [closed] : [signal, closed];
  const abort = (): void => {
    const source = sources.find((s) => s.aborted);
    controller.abort(source?.reason);
  };
  for (const source of sources) {
    source.addEventListener("abort", abort);
  }
  if (sources.some((s) => s.aborted)) {
    abort();
  }
  return {
    signal: controller.signal,
    dispose: () => {
      for (const source of sources) {
        source.removeEventListener("abort", abort);
      }
    },
  };
}
