/**
 * A hand-written AgentService served over real gRPC (HTTP/2, in this
 * process) that serves one run of N_EVENTS fixed events and fails calls as a
 * test scripts it: per call number (0 for the first call, 1 for the next,
 * ...), where to end it and how (a status, or a connection that breaks). On
 * every resumed Observe it re-sends a few events the client already has, so
 * dedupe is exercised too. The twin of tests/unit/test_client_resume.py.
 */
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { Code, ConnectError, type ConnectRouter, type ServiceImpl } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  AgentService,
  type AgentEventSchema,
  type ResumeRequest,
  RunSchema,
  RunState,
  type Run,
  type StreamRequest,
} from "../src/gen/keel/v1/agent_service_pb.js";

export const RUN_ID = "run-1";
export const N_EVENTS = 20;
const BATCH_SIZE = 3;

/** One request the server received. */
export interface Call {
  rpc: "Stream" | "Observe" | "Resume";
  key: string; // request_id for Stream and Resume, run_id for Observe
  offset: bigint;
}

/** How a call ends before serving everything. */
export type Failure =
  | { at: number; code: Code } // a status before index `at` (-1: before the snapshot)
  | { at: number; drop: true } // the connection breaks before index `at`
  | { at: number; stall: true }; // the stream goes silent before index `at`

/** A message of any of the three streams (they share their shape). */
type Message = {
  kind:
    | { case: "snapshot"; value: { run: Run } }
    | { case: "events"; value: { events: MessageInitShape<typeof AgentEventSchema>[] } }
    | { case: "heartbeat"; value: { nextOffset: bigint } };
};

export class FakeAgentService {
  /** Call number -> how that call fails; calls not listed serve to the end, OK. */
  failures = new Map<number, Failure>();
  /** Events below the requested offset re-sent by Observe. */
  duplicates = 3;
  /** An index never sent: a server bug (a gap). */
  skipIndex: bigint | undefined;
  /** The first index a Resume stream delivers. */
  resumeFrom = 10n;
  readonly calls: Call[] = [];
  readonly resumes: ResumeRequest[] = [];
  readonly streams: StreamRequest[] = [];
  /** The thread ids DeleteThread was called with. */
  readonly deletedThreads: string[] = [];
  target = "";
  readonly #sessions = new Set<http2.ServerHttp2Session>();
  #server: http2.Http2Server | undefined;

  async start(): Promise<string> {
    const handler = connectNodeAdapter({
      routes: (router: ConnectRouter) => router.service(AgentService, this.#impl()),
    });
    const server = http2.createServer(handler);
    server.on("session", (session) => {
      this.#sessions.add(session);
      session.on("close", () => this.#sessions.delete(session));
    });
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    this.#server = server;
    this.target = `127.0.0.1:${(server.address() as AddressInfo).port}`;
    return this.target;
  }

  async stop(): Promise<void> {
    for (const session of this.#sessions) {
      session.destroy();
    }
    await new Promise<void>((resolve) => this.#server?.close(() => resolve()) ?? resolve());
  }

  run(requestId = ""): Run {
    return create(RunSchema, {
      runId: RUN_ID,
      agentId: "scripted",
      state: RunState.RUNNING,
      requestId,
      nextOffset: BigInt(N_EVENTS),
    });
  }

  /** The messages of call number calls.length - 1, from index `start`. */
  async *#serve(start: bigint, run: Run, signal: AbortSignal): AsyncGenerator<Message> {
    const number = this.calls.length - 1;
    const failure = this.failures.get(number);
    const stop = BigInt(failure?.at ?? N_EVENTS);
    if (stop < 0n) {
      yield* this.#fail(failure, number, signal);
      return;
    }
    yield { kind: { case: "snapshot", value: { run } } };
    const indices: bigint[] = [];
    for (let i = start; i < stop && i < BigInt(N_EVENTS); i++) {
      if (i !== this.skipIndex) {
        indices.push(i);
      }
    }
    for (let first = 0; first < indices.length; first += BATCH_SIZE) {
      const batch = indices.slice(first, first + BATCH_SIZE).map((index) => ({
        runId: RUN_ID,
        index,
        payload: { case: "textDelta" as const, value: { delta: `t${index} ` } },
      }));
      yield { kind: { case: "events", value: { events: batch } } };
      yield {
        kind: { case: "heartbeat", value: { nextOffset: batch[batch.length - 1]!.index + 1n } },
      };
    }
    if (stop < BigInt(N_EVENTS)) {
      yield* this.#fail(failure, number, signal);
    }
  }

  async *#fail(
    failure: Failure | undefined,
    number: number,
    signal: AbortSignal,
  ): AsyncGenerator<Message> {
    if (failure !== undefined && "drop" in failure) {
      await new Promise((resolve) => setTimeout(resolve, 100)); // let what was sent reach the client
      for (const session of this.#sessions) {
        session.destroy(); // the client sees its connection break, as when a server dies
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    } else if (failure !== undefined && "stall" in failure) {
      await new Promise((resolve) => signal.addEventListener("abort", resolve));
    } else {
      throw new ConnectError(
        `call ${number} fails at index ${failure?.at}`,
        failure?.code ?? Code.Unavailable,
      );
    }
  }

  #impl(): ServiceImpl<typeof AgentService> {
    const fake = this;
    return {
      async *stream(request, context) {
        fake.calls.push({ rpc: "Stream", key: request.requestId, offset: 0n });
        fake.streams.push(request);
        yield* fake.#serve(0n, fake.run(request.requestId), context.signal);
      },
      async *observe(request, context) {
        fake.calls.push({ rpc: "Observe", key: request.runId, offset: request.offset });
        const start = request.offset - BigInt(fake.duplicates);
        yield* fake.#serve(start > 0n ? start : 0n, fake.run(), context.signal);
      },
      async *resume(request, context) {
        fake.calls.push({ rpc: "Resume", key: request.requestId, offset: fake.resumeFrom });
        fake.resumes.push(request);
        yield* fake.#serve(fake.resumeFrom, fake.run(), context.signal);
      },
      startRun(request) {
        const run = fake.run(request.requestId);
        run.agentId = request.agentId;
        run.input = request.input;
        run.threadId = request.threadId;
        run.untilIdle = request.untilIdle;
        return { run };
      },
      getRun(request) {
        if (request.runId !== RUN_ID) {
          throw new ConnectError(`run ${JSON.stringify(request.runId)} not found`, Code.NotFound);
        }
        return { run: fake.run() };
      },
      listRuns(request) {
        const token = `${request.agentId}|${request.states.join(",")}|${request.threadId}|${request.pageSize}|${request.pageToken}`;
        return { runs: [fake.run()], nextPageToken: token };
      },
      cancelRun(request) {
        const run = fake.run();
        run.state = RunState.CANCELLED;
        run.error = request.reason;
        return { run };
      },
      listAgents() {
        return { agents: [{ agentId: "scripted" }] };
      },
      // Threads: echo the request back, so a test sees what the client sent.
      createThread(request) {
        const { threadId, resourceId, metadata, requestId } = request;
        return { thread: { threadId: threadId || "thread-1", resourceId, metadata, requestId } };
      },
      getThread(request) {
        if (request.threadId !== "thread-1") {
          const message = `thread ${JSON.stringify(request.threadId)} not found`;
          throw new ConnectError(message, Code.NotFound);
        }
        return { thread: { threadId: request.threadId, activeRunId: RUN_ID } };
      },
      listThreads(request) {
        const token = `${request.resourceId}|${request.pageSize}|${request.pageToken}`;
        return { threads: [{ threadId: "thread-1" }], nextPageToken: token };
      },
      deleteThread(request) {
        fake.deletedThreads.push(request.threadId);
        return {};
      },
      listThreadMessages(request) {
        const { threadId, pageSize, pageToken, newestFirst } = request;
        const token = `${threadId}|${pageSize}|${pageToken}|${newestFirst}`;
        return { messages: [{ index: 0n, runId: RUN_ID }], nextPageToken: token };
      },
      // Background tasks: echo the request back, so a test sees what the client sent.
      getTask(request) {
        return { task: { taskId: request.taskId, runId: RUN_ID } };
      },
      listTasks(request) {
        const { runId, agentId, statuses, pageSize, pageToken } = request;
        const token = `${runId}|${agentId}|${statuses.join(",")}|${pageSize}|${pageToken}`;
        return { tasks: [{ taskId: `${RUN_ID}.0000000000000000` }], nextPageToken: token };
      },
      cancelTask(request) {
        return { task: { taskId: request.taskId, error: request.reason } };
      },
      retryTask(request) {
        return { task: { taskId: request.taskId } };
      },
      // Schedules (the real ones are tested against Keel): echo the request back.
      createSchedule(request) {
        const { agentId, cron, timezone, input, scheduleId } = request;
        return {
          schedule: { scheduleId: scheduleId || "schedule-1", agentId, cron, timezone, input },
        };
      },
      getSchedule(request) {
        return { schedule: { scheduleId: request.scheduleId } };
      },
      listSchedules(request) {
        const token = `${request.agentId}|${request.pageSize}|${request.pageToken}`;
        return { schedules: [{ scheduleId: "schedule-1" }], nextPageToken: token };
      },
      updateSchedule(request) {
        return { schedule: request.schedule };
      },
      deleteSchedule() {
        return {};
      },
      triggerSchedule(request) {
        return { run: fake.run(request.requestId), firing: { runId: RUN_ID } };
      },
      listScheduleRuns(request) {
        const token = `${request.scheduleId}|${request.pageSize}|${request.pageToken}`;
        return { firings: [{ runId: RUN_ID }], nextPageToken: token };
      },
    };
  }
}
