/**
 * RunHandle's incarnation checks against a real gRPC server (in this process)
 * scripted per call. A resuming handle sends the incarnation of the store
 * that wrote the events it holds (ObserveRequest.incarnation): the snapshot's
 * run.incarnation, then a heartbeat's newer one. A server whose store came
 * back with an older state answers FAILED_PRECONDITION (LOG_ROLLED_BACK, with
 * an ErrorInfo in the status details): the handle throws LogRolledBack with
 * the metadata parsed, and never retries it. The twin of
 * tests/unit/test_client_rollback.py.
 */
import assert from "node:assert/strict";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { afterEach, beforeEach, describe, test } from "node:test";
import { Code, ConnectError, type ConnectRouter } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { BinaryWriter, WireType } from "@bufbuild/protobuf/wire";
import {
  AgentService,
  KeelClient,
  LogRolledBack,
  RunState,
  errorInfo,
  type AgentEvent,
  type AgentEventSchema,
  type ObserveRequest,
  type RunSchema,
} from "../src/index.js";

const RUN_ID = "run-1";
const HEAD = 12;

/** A message of any of the three streams (they share their shape). */
type Message = {
  kind:
    | { case: "snapshot"; value: { run: MessageInitShape<typeof RunSchema> } }
    | { case: "events"; value: { events: MessageInitShape<typeof AgentEventSchema>[] } }
    | { case: "heartbeat"; value: { nextOffset: bigint; incarnation: string } };
};

function snapshot(incarnation: string): Message {
  const run = { runId: RUN_ID, state: RunState.RUNNING, nextOffset: BigInt(HEAD), incarnation };
  return { kind: { case: "snapshot", value: { run } } };
}

function events(start: number, end: number): Message {
  const batch = [];
  for (let index = start; index < end; index++) {
    const payload = { case: "textDelta" as const, value: { delta: `t${index}` } };
    batch.push({ runId: RUN_ID, index: BigInt(index), payload });
  }
  return { kind: { case: "events", value: { events: batch } } };
}

function heartbeat(nextOffset: number, incarnation = ""): Message {
  return { kind: { case: "heartbeat", value: { nextOffset: BigInt(nextOffset), incarnation } } };
}

/** A google.rpc.ErrorInfo, encoded by hand: reason = 1, domain = 2, map<string, string> metadata = 3. */
function encodeErrorInfo(reason: string, metadata: Record<string, string>): Uint8Array {
  const writer = new BinaryWriter();
  writer.tag(1, WireType.LengthDelimited).string(reason);
  writer.tag(2, WireType.LengthDelimited).string("keel.dev");
  for (const [key, value] of Object.entries(metadata)) {
    writer.tag(3, WireType.LengthDelimited).fork();
    writer.tag(1, WireType.LengthDelimited).string(key);
    writer.tag(2, WireType.LengthDelimited).string(value);
    writer.join();
  }
  return writer.finish();
}

/** FAILED_PRECONDITION with an ErrorInfo of `reason` in its status details. */
function failedPrecondition(reason: string, metadata: Record<string, string>): ConnectError {
  const error = new ConnectError("the store lost events", Code.FailedPrecondition);
  error.details = [{ type: "google.rpc.ErrorInfo", value: encodeErrorInfo(reason, metadata) }];
  return error;
}

/** What one call serves: these messages, then OK or `error`. */
interface Script {
  messages: Message[];
  error?: ConnectError;
}

const unavailable = (): ConnectError => new ConnectError("dropped", Code.Unavailable);

/** Serves call number n (Observe, Stream or Resume) as scripts[n] says; records the Observes. */
class ScriptedService {
  scripts: Script[] = [];
  readonly observes: ObserveRequest[] = [];
  calls = 0;
  target = "";
  #server: http2.Http2Server | undefined;
  readonly #sessions = new Set<http2.ServerHttp2Session>();

  async start(): Promise<string> {
    const fake = this;
    async function* serve(): AsyncGenerator<Message> {
      const script = fake.scripts[fake.calls++] ?? { messages: [] };
      yield* script.messages;
      if (script.error !== undefined) {
        throw script.error;
      }
    }
    const handler = connectNodeAdapter({
      routes: (router: ConnectRouter) =>
        router.service(AgentService, {
          async *observe(request) {
            fake.observes.push(request);
            yield* serve();
          },
          stream: serve,
          resume: serve,
        }),
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

  /** [offset, incarnation] of every Observe received. */
  sent(): [bigint, string][] {
    return this.observes.map((request) => [request.offset, request.incarnation]);
  }
}

let service: ScriptedService;
let client: KeelClient;

beforeEach(async () => {
  service = new ScriptedService();
  client = new KeelClient(await service.start(), { initialBackoffMs: 1, maxBackoffMs: 10 });
});

afterEach(async () => {
  client.close();
  await service.stop();
});

function range(start: number, end: number): bigint[] {
  return Array.from({ length: end - start }, (_, i) => BigInt(start + i));
}

async function indices(events: AsyncIterable<AgentEvent>): Promise<bigint[]> {
  const seen: bigint[] = [];
  for await (const event of events) {
    seen.push(event.index);
  }
  return seen;
}

describe("the incarnation a handle resumes with", () => {
  test("reconnects send the snapshot's incarnation, then a newer heartbeat's", async () => {
    service.scripts = [
      // Started below the head (12): the snapshot's incarnation is the one to send.
      { messages: [snapshot("A"), events(0, 3), heartbeat(3), events(3, 5)], error: unavailable() },
      // The store changed under the stream: a heartbeat says so before the new events.
      { messages: [snapshot("A"), heartbeat(5, "B"), events(5, 8)], error: unavailable() },
      { messages: [snapshot("B"), events(8, HEAD)] },
    ];
    const handle = client.run(RUN_ID);
    const seen = new Map<bigint, string>();

    for await (const event of handle.events()) {
      seen.set(event.index, handle.incarnation);
    }

    assert.deepEqual([...seen.keys()], range(0, HEAD));
    assert.deepEqual(service.sent(), [
      [0n, ""],
      [5n, "A"],
      [8n, "B"],
    ]);
    assert.equal(seen.get(4n), "A");
    assert.equal(seen.get(5n), "B"); // the heartbeat came before event 5
    assert.equal(handle.incarnation, "B");
    assert.equal(handle.reconnects.length, 2);
  });

  test("a stream() handle sends the incarnation its Stream's snapshot named", async () => {
    service.scripts = [
      { messages: [snapshot("A"), events(0, 4)], error: unavailable() },
      { messages: [snapshot("A"), events(4, HEAD)] },
    ];
    const handle = client.stream("scripted", "{}");

    assert.deepEqual(await indices(handle.events()), range(0, HEAD));
    assert.deepEqual(service.sent(), [[4n, "A"]]);
  });

  test("a resume() handle sends the incarnation its Resume's snapshot named", async () => {
    service.scripts = [
      { messages: [snapshot("A"), events(6, 8)], error: unavailable() },
      { messages: [snapshot("A"), events(8, HEAD)] },
    ];
    const handle = client.resume(RUN_ID, [
      { toolCallId: "call_1", decision: { case: "approve", value: {} } },
    ]);

    assert.deepEqual(await indices(handle.events()), range(6, HEAD));
    assert.deepEqual(service.sent(), [[8n, "A"]]);
  });

  test("a heartbeat behind the handle, or without an incarnation, keeps the handle's", async () => {
    service.scripts = [
      { messages: [snapshot("A"), events(0, 6)], error: unavailable() },
      // A server that re-sends events the handle holds: a heartbeat among them
      // speaks for fewer events than the handle holds, one without incarnation for none.
      {
        messages: [snapshot("A"), events(3, 5), heartbeat(5, "OLD"), events(5, 7), heartbeat(7)],
      },
    ];
    const handle = client.run(RUN_ID);

    assert.deepEqual(await indices(handle.events()), range(0, 7));
    assert.equal(handle.incarnation, "A");
  });

  test("a reconnect before the first event sends no incarnation", async () => {
    service.scripts = [
      { messages: [snapshot("A")], error: unavailable() },
      { messages: [snapshot("A"), events(0, 2)] },
    ];
    const handle = client.run(RUN_ID);

    assert.deepEqual(await indices(handle.events()), range(0, 2));
    assert.equal(handle.incarnation, "A"); // remembered, but no event held at offset 0 to vouch for
    assert.deepEqual(service.sent(), [
      [0n, ""],
      [0n, ""],
    ]);
  });

  test("fromOffset past nextOffset forgets the incarnation, at or below keeps it", async () => {
    service.scripts = [
      { messages: [snapshot("A"), events(0, 6)] },
      { messages: [snapshot("B"), events(2, 4)] }, // re-read from 2: the handle holds 0..5
      { messages: [snapshot("C"), events(9, 10)] }, // skip ahead to 9: it holds no event 8
      { messages: [snapshot("C"), events(10, HEAD)] }, // fromOffset == nextOffset: a resume
    ];
    const handle = client.run(RUN_ID);

    assert.deepEqual(await indices(handle.events()), range(0, 6));
    assert.deepEqual(await indices(handle.events({ fromOffset: 2 })), range(2, 4));
    assert.equal(handle.incarnation, "B");
    assert.deepEqual(await indices(handle.events({ fromOffset: 9 })), range(9, 10));
    assert.deepEqual(await indices(handle.events({ fromOffset: 10 })), range(10, HEAD));

    assert.deepEqual(service.sent(), [
      [0n, ""],
      [2n, "A"],
      [9n, ""],
      [10n, "C"],
    ]);
  });
});

describe("LOG_ROLLED_BACK", () => {
  test("becomes LogRolledBack with its metadata, and is not retried", async () => {
    const metadata = {
      run_id: RUN_ID,
      offset: "9",
      next_offset: "7",
      incarnation: "A",
      diverged_at: "5",
    };
    service.scripts = [
      { messages: [snapshot("A"), events(0, 9)], error: unavailable() },
      { messages: [], error: failedPrecondition("LOG_ROLLED_BACK", metadata) },
    ];
    const handle = client.run(RUN_ID);
    const seen: bigint[] = [];

    const error = await (async () => {
      try {
        for await (const event of handle.events()) {
          seen.push(event.index);
        }
      } catch (caught) {
        return caught;
      }
      return undefined;
    })();

    assert.ok(error instanceof LogRolledBack, String(error));
    assert.equal(error.name, "LogRolledBack");
    assert.deepEqual(
      [error.runId, error.offset, error.nextOffset, error.incarnation, error.divergedAt],
      [RUN_ID, 9n, 7n, "A", 5n],
    );
    assert.match(error.message, /lost events/);
    assert.match(error.message, /fromOffset: 5/);
    assert.ok(error.cause instanceof ConnectError);
    assert.equal(error.cause.code, Code.FailedPrecondition);
    assert.equal(errorInfo(error.cause)?.reason, "LOG_ROLLED_BACK");
    assert.deepEqual(seen, range(0, 9));
    assert.deepEqual(service.sent(), [
      [0n, ""],
      [9n, "A"], // the rolled-back resume, not retried
    ]);
    assert.equal(handle.reconnects.length, 1);

    // The way out the error names: read again from divergedAt (the claim still holds there).
    service.scripts.push({ messages: [snapshot("B"), events(5, 7)] });
    assert.deepEqual(await indices(handle.events({ fromOffset: error.divergedAt! })), range(5, 7));
    assert.deepEqual(service.sent().at(-1), [5n, "A"]);
    assert.equal(handle.incarnation, "B");
  });

  test("on a live stream, without divergedAt", async () => {
    const metadata = { run_id: RUN_ID, offset: "4", next_offset: "2", incarnation: "A" };
    service.scripts = [
      {
        messages: [snapshot("A"), events(0, 4)],
        error: failedPrecondition("LOG_ROLLED_BACK", metadata),
      },
    ];
    const handle = client.run(RUN_ID);

    await assert.rejects(indices(handle.events()), (error: unknown) => {
      assert.ok(error instanceof LogRolledBack);
      assert.deepEqual([error.offset, error.nextOffset, error.divergedAt], [4n, 2n, undefined]);
      assert.match(error.message, /fromOffset: 0/);
      return true;
    });
    assert.equal(service.calls, 1);
    assert.equal(handle.reconnects.length, 0);
  });

  test("other FAILED_PRECONDITION reasons stay ConnectErrors", async () => {
    service.scripts = [
      { messages: [], error: failedPrecondition("THREAD_BUSY", { thread_id: "thread-1" }) },
    ];

    await assert.rejects(indices(client.run(RUN_ID).events()), (error: unknown) => {
      assert.ok(error instanceof ConnectError && !(error instanceof LogRolledBack));
      assert.equal(error.code, Code.FailedPrecondition);
      assert.equal(errorInfo(error)?.reason, "THREAD_BUSY");
      return true;
    });
    assert.equal(service.calls, 1);
  });
});
