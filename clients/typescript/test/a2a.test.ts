/**
 * A2A with the A2A project's JavaScript SDK (@a2a-js/sdk) as the caller, against
 * a real Keel server's HTTP port (docs/a2a.md): the card, a streamed run
 * reassembled from its artifact chunks, GetTask, a non-streaming SendMessage,
 * TaskNotFound and CancelTask, over JSON-RPC and HTTP+JSON. The SDK speaks A2A
 * 1.0 and sends `A2A-Version: 1.0` on every call, which is what Keel serves.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import {
  Role,
  TaskState,
  type Message,
  type SendMessageRequest,
  type StreamResponse,
  type Task,
} from "@a2a-js/sdk";
import {
  ClientFactory,
  DefaultAgentCardResolver,
  JsonRpcTransportFactory,
  RestTransportFactory,
  type Client,
} from "@a2a-js/sdk/client";
import { A2A_ERROR_CODE, isJsonRpcError, isRestError } from "@a2a-js/sdk/errors";
import { Keel, Redis, freePort, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 120_000;
const AGENT = "scripted";
const NEXT_OFFSET = "keel.dev/next_offset";
/** What the scripted agent answers to script(text(50)): its final answer. */
const SCRIPTED_TEXT = Array.from({ length: 50 }, (_, i) => `t${i} `).join("") + "done";

type Binding = "JSONRPC" | "HTTP+JSON";
type Step = { text: number; delay_ms?: number };

function script(...steps: Step[]): string {
  return JSON.stringify({ steps });
}

function userMessage(text: string): Message {
  return {
    messageId: randomUUID(),
    contextId: "",
    taskId: "",
    role: Role.ROLE_USER,
    parts: [
      { content: { $case: "text", value: text }, metadata: undefined, filename: "", mediaType: "" },
    ],
    metadata: undefined,
    extensions: [],
    referenceTaskIds: [],
  };
}

function sendRequest(text: string, returnImmediately = false): SendMessageRequest {
  return {
    tenant: "",
    message: userMessage(text),
    configuration: {
      acceptedOutputModes: [],
      taskPushNotificationConfig: undefined,
      returnImmediately,
    },
    metadata: undefined,
  };
}

function textOf(parts: { content?: { $case: string; value: unknown } }[]): string {
  return parts.map((p) => (p.content?.$case === "text" ? String(p.content.value) : "")).join("");
}

/** A task's stream as a client sees it: the text artifact rebuilt from its chunks. */
class Reassembled {
  text = "";
  taskId = "";
  states: TaskState[] = [];
  lastChunk = false;
  nextOffset = 0;

  add(response: StreamResponse): void {
    const payload = response.payload;
    switch (payload?.$case) {
      case "task":
        this.taskId = payload.value.id;
        break;
      case "statusUpdate":
        this.taskId ||= payload.value.taskId;
        this.states.push(payload.value.status?.state ?? TaskState.TASK_STATE_UNSPECIFIED);
        this.offset(payload.value.metadata);
        break;
      case "artifactUpdate": {
        const { artifact, append, lastChunk } = payload.value;
        this.offset(payload.value.metadata);
        if (artifact?.artifactId === "text") {
          const chunk = textOf(artifact.parts);
          this.text = append ? this.text + chunk : chunk;
          this.lastChunk = lastChunk;
        }
        break;
      }
      default:
        break;
    }
  }

  private offset(metadata: Record<string, unknown> | undefined): void {
    const value = metadata?.[NEXT_OFFSET];
    if (value !== undefined) {
      this.nextOffset = Number(value);
    }
  }
}

async function consume(
  stream: AsyncIterable<StreamResponse>,
  into: Reassembled,
  stopAfter?: number,
): Promise<Reassembled> {
  let seen = 0;
  for await (const response of stream) {
    into.add(response);
    seen += 1;
    if (stopAfter !== undefined && seen >= stopAfter) {
      break;
    }
  }
  return into;
}

/** Asserts that `promise` fails with A2A's TaskNotFound, in the binding's own terms. */
async function assertTaskNotFound(promise: Promise<unknown>, binding: string): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    if (binding === "JSONRPC") {
      assert.ok(isJsonRpcError(error), `not a JSON-RPC error: ${String(error)}`);
      assert.equal(error.envelopeCode, A2A_ERROR_CODE.TASK_NOT_FOUND);
    } else {
      assert.ok(isRestError(error), `not a REST error: ${String(error)}`);
      assert.equal(error.statusCode, 404);
    }
    assert.equal((error as { reason?: string }).reason, "TASK_NOT_FOUND");
    return true;
  });
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("@a2a-js/sdk against Keel's A2A routes", { timeout: TEST_TIMEOUT_MS }, () => {
  let keel: Keel;

  before(async () => {
    keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `ts-${randomUUID()}`,
      httpPort: await freePort(),
    });
  });

  after(async () => {
    await keel.kill();
  });

  /** The agent's URL as the SDK's card resolver takes it: it resolves the card's
   * relative path (".well-known/agent-card.json") against it, so the slash at the
   * end matters (without it the card would be looked for at /a2a/.well-known/...). */
  function agentUrl(): string {
    return `${keel.httpUrl}/a2a/${AGENT}/`;
  }

  /** The A2A-Version header of every request the clients made. */
  const versions: (string | null)[] = [];
  const recording: typeof fetch = (input, init) => {
    versions.push(new Headers(init?.headers).get("a2a-version"));
    return fetch(input, init);
  };

  async function clientOver(binding: Binding): Promise<Client> {
    const factory = new ClientFactory({
      transports: [
        new JsonRpcTransportFactory({ fetchImpl: recording }),
        new RestTransportFactory({ fetchImpl: recording }),
      ],
      cardResolver: new DefaultAgentCardResolver({ fetchImpl: recording }),
      preferredTransports: [binding],
    });
    const client = await factory.createFromUrl(agentUrl());
    assert.equal(client.transport.protocolName, binding);
    assert.equal(client.protocolVersion, "1.0");
    return client;
  }

  test("resolves the agent's card", async () => {
    const factory = new ClientFactory();
    const client = await factory.createFromUrl(agentUrl());
    const card = await client.getAgentCard();
    assert.equal(card.name, AGENT);
    assert.equal(card.capabilities?.streaming, true);
    const bindings = new Map(card.supportedInterfaces.map((i) => [i.protocolBinding, i]));
    assert.ok(bindings.get("JSONRPC")?.url.endsWith(`/a2a/${AGENT}`));
    assert.ok(bindings.get("HTTP+JSON")?.url.endsWith(`/a2a/${AGENT}/rest`));
    assert.equal(bindings.get("JSONRPC")?.protocolVersion, "1.0");
    // JSON-RPC is the SDK's default binding, and the card's first.
    assert.equal(client.transport.protocolName, "JSONRPC");
    // The default agent's card, at the root.
    const root = await new DefaultAgentCardResolver().resolve(keel.httpUrl);
    assert.ok(root.supportedInterfaces.length > 0);
  });

  for (const binding of ["JSONRPC", "HTTP+JSON"] as const) {
    describe(`over ${binding}`, () => {
      let client: Client;

      before(async () => {
        client = await clientOver(binding);
      });

      test("a streamed run is one text artifact, and GetTask shows it completed", async () => {
        const got = await consume(
          client.sendMessageStream(sendRequest(script({ text: 50 }))),
          new Reassembled(),
        );
        assert.equal(got.text, SCRIPTED_TEXT);
        assert.ok(got.lastChunk, "no lastChunk on the artifact's last chunk");
        assert.equal(got.states[0], TaskState.TASK_STATE_WORKING);
        assert.equal(got.states.at(-1), TaskState.TASK_STATE_COMPLETED);
        assert.ok(got.nextOffset > 0);
        const task = await client.getTask({ tenant: "", id: got.taskId });
        assert.equal(task.id, got.taskId);
        assert.equal(task.status?.state, TaskState.TASK_STATE_COMPLETED);
        assert.equal(textOf(task.artifacts[0]?.parts ?? []), SCRIPTED_TEXT);
        assert.ok(task.contextId, "the task has no context");
      });

      test("a non-streaming SendMessage answers with the finished task", async () => {
        const result = await client.sendMessage(sendRequest(script({ text: 5 })));
        assert.ok("status" in result, `not a task: ${JSON.stringify(result)}`);
        const task = result as Task;
        assert.equal(task.status?.state, TaskState.TASK_STATE_COMPLETED);
        assert.equal(textOf(task.artifacts[0]?.parts ?? []), "t0 t1 t2 t3 t4 done");
      });

      test("an unknown task is A2A's TaskNotFound", async () => {
        await assertTaskNotFound(client.getTask({ tenant: "", id: randomUUID() }), binding);
        await assertTaskNotFound(
          client.cancelTask({ tenant: "", id: randomUUID(), metadata: undefined }),
          binding,
        );
      });

      test("CancelTask cancels a slow run", async () => {
        const started = await consume(
          client.sendMessageStream(sendRequest(script({ text: 50, delay_ms: 100 }))),
          new Reassembled(),
          2,
        );
        assert.ok(started.taskId);
        const cancelled = await client.cancelTask({
          tenant: "",
          id: started.taskId,
          metadata: undefined,
        });
        assert.equal(cancelled.id, started.taskId);
        let task = await client.getTask({ tenant: "", id: started.taskId });
        // The run's owner aborts it soon after.
        for (let i = 0; i < 200 && task.status?.state !== TaskState.TASK_STATE_CANCELED; i++) {
          await new Promise((resolve) => setTimeout(resolve, 50));
          task = await client.getTask({ tenant: "", id: started.taskId });
        }
        assert.equal(task.status?.state, TaskState.TASK_STATE_CANCELED);
        assert.ok(textOf(task.artifacts[0]?.parts ?? []).length < SCRIPTED_TEXT.length);
      });
    });
  }

  test("every request said A2A-Version: 1.0 (Keel's 1.0 methods need it)", () => {
    assert.ok(versions.length > 10, `only ${versions.length} requests recorded`);
    assert.deepEqual(new Set(versions), new Set(["1.0"]));
  });
});
