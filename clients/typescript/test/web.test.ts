/**
 * The browser entry point, "@keel/client/web", run in Node (its transports
 * use fetch, which Node 20 has) against real Keel servers' HTTP ports
 * (`serve --http-port`): the same answers over Connect JSON, Connect binary
 * and gRPC-Web; a RunHandle that continues across a server SIGKILLed and
 * replaced on the same ports; API keys; and an import graph of the built
 * entry point with no Node module in it.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import { builtinModules } from "node:module";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { KeelClient as NodeKeelClient } from "../src/index.js";
import {
  ClientClosedError,
  Code,
  ConnectError,
  KeelClient,
  RunState,
  errorInfo,
  isUnavailable,
  type AgentEvent,
  type KeelClientOptions,
} from "../src/web.js";
import { Keel, Redis, addApiKey, freePort, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 120_000;
const FAST = { initialBackoffMs: 20, maxBackoffMs: 250 };

/** The three ways a browser talks to Keel's HTTP port. */
const PROTOCOLS: { name: string; options: KeelClientOptions }[] = [
  { name: "Connect JSON", options: { protocol: "connect", binary: false } },
  { name: "Connect binary", options: { protocol: "connect", binary: true } },
  { name: "gRPC-Web", options: { protocol: "grpc-web" } },
];

type Step = { text: number; delay_ms?: number } | { tool: string; args: Record<string, unknown> };

function script(...steps: Step[]): string {
  return JSON.stringify({ steps });
}

function assertContiguous(events: AgentEvent[], start = 0n): void {
  const indices = events.map((e) => e.index);
  const expected = indices.map((_, i) => start + BigInt(i));
  assert.deepEqual(indices, expected, "indices with a gap or a duplicate");
}

function payloads(events: AgentEvent[]): string[] {
  return events.map((e) => e.payload.case ?? "");
}

function textOf(events: AgentEvent[]): string {
  return events.map((e) => (e.payload.case === "textDelta" ? e.payload.value.delta : "")).join("");
}

function deltas(n: number): string {
  return Array.from({ length: n }, (_, i) => `t${i} `).join("");
}

/** The events without the partial output of superseded attempts (what a UI keeps). */
function effective(events: AgentEvent[]): AgentEvent[] {
  const dropped = new Set<bigint>();
  for (const event of events) {
    if (event.payload.case === "stepSuperseded") {
      for (let i = event.payload.value.fromIndex; i < event.index; i++) {
        dropped.add(i);
      }
    }
  }
  return events.filter((event) => !dropped.has(event.index));
}

async function collect(events: AsyncIterable<AgentEvent>): Promise<AgentEvent[]> {
  const out: AgentEvent[] = [];
  for await (const event of events) {
    out.push(event);
  }
  return out;
}

async function waitForState(client: KeelClient, runId: string, state: RunState): Promise<void> {
  const deadline = Date.now() + 30_000;
  while ((await client.getRun(runId)).state !== state) {
    assert.ok(Date.now() < deadline, `run ${runId} never reached ${RunState[state]}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function assertConnectError(error: unknown, code: Code): true {
  assert.ok(error instanceof ConnectError, `not a ConnectError: ${String(error)}`);
  assert.equal(error.code, code, `${Code[error.code]}: ${error.rawMessage}`);
  return true;
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("the web client against one server's HTTP port", { timeout: TEST_TIMEOUT_MS }, () => {
  let keel: Keel;
  let clients: { name: string; client: KeelClient }[];
  let grpc: NodeKeelClient;

  before(async () => {
    keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `ts-${randomUUID()}`,
      httpPort: await freePort(),
    });
    clients = PROTOCOLS.map(({ name, options }) => ({
      name,
      client: new KeelClient(keel.httpUrl, { ...FAST, ...options }),
    }));
    grpc = new NodeKeelClient(keel.target, FAST);
  });

  after(async () => {
    for (const { client } of clients) {
      client.close();
    }
    grpc.close();
    await keel.kill();
  });

  test("listAgents, startRun and getRun give the same answers over Connect JSON, Connect binary and gRPC-Web", async () => {
    const agents = await grpc.listAgents();
    assert.ok(agents.some((agent) => agent.agentId === "scripted"));
    const requestId = randomUUID();
    const input = script({ text: 20 }, { tool: "record", args: { key: "k" } }, { text: 5 });
    const started = [];
    for (const { name, client } of clients) {
      assert.deepEqual(await client.listAgents(), agents, `listAgents over ${name}`);
      // The same request_id: every protocol gets the one run the first started.
      started.push(await client.startRun("scripted", input, { requestId }));
    }
    const runId = started[0]!.runId;
    assert.ok(runId);
    assert.deepEqual(
      started.map((run) => run.runId),
      clients.map(() => runId),
    );
    await waitForState(clients[0]!.client, runId, RunState.SUCCEEDED);
    const run = await grpc.getRun(runId);
    const events = await collect(grpc.observeRun(runId));
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "finish");
    for (const { name, client } of clients) {
      assert.deepEqual(await client.getRun(runId), run, `getRun over ${name}`);
      assert.deepEqual(await collect(client.observeRun(runId)), events, `observeRun over ${name}`);
      const page = await client.listRuns({ agentId: "scripted", pageSize: 1000 });
      assert.ok(
        page.runs.some((r) => r.runId === runId),
        `listRuns over ${name}`,
      );
    }
  });

  test("a server's error reads the same over every protocol: code, message and ErrorInfo", async () => {
    for (const { name, client } of clients) {
      await assert.rejects(client.getRun("no-such-run"), (error) => {
        assertConnectError(error, Code.NotFound);
        assert.equal(errorInfo(error)?.reason, "RUN_NOT_FOUND", name);
        assert.equal(isUnavailable(error), false, "an answer is not retried");
        return true;
      });
      const stream = client.observeRun("no-such-run");
      await assert.rejects(stream.next(), (error) => assertConnectError(error, Code.NotFound));
    }
  });

  test("stream() over each protocol delivers every event of a run exactly once, in order", async () => {
    for (const { name, client } of clients) {
      const handle = client.stream("scripted", script({ text: 30, delay_ms: 2 }, { text: 10 }));
      const events = await collect(handle.events());
      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "finish", name);
      assert.ok(textOf(events).startsWith(deltas(40)), name);
      assert.equal(handle.nextOffset, BigInt(events.length));
      assert.equal(handle.snapshot?.run?.runId, handle.runId);
      assert.deepEqual(handle.reconnects, []);
    }
  });

  test("close() ends open streams with ClientClosedError, raw calls of rpc too, and refuses later calls", async () => {
    const client = new KeelClient(keel.httpUrl, FAST);
    const run = await client.startRun("scripted", script({ text: 100_000, delay_ms: 10 }));
    try {
      const events = client.observeRun(run.runId);
      const raw = client.rpc.observe({ runId: run.runId })[Symbol.asyncIterator]();
      assert.equal((await events.next()).value?.index, 0n);
      assert.equal((await raw.next()).value?.kind.case, "snapshot");
      client.close();
      // What was received before close() may still come; then ClientClosedError.
      await assert.rejects(async () => {
        for await (const _ of events);
      }, ClientClosedError);
      await assert.rejects(async () => {
        for (let r = await raw.next(); !r.done; r = await raw.next());
      }, ClientClosedError);
      await assert.rejects(client.getRun(run.runId), ClientClosedError);
      client.close(); // safe twice
    } finally {
      await grpc.cancelRun(run.runId);
    }
  });
});

describe("the web client across server restarts", { timeout: TEST_TIMEOUT_MS }, () => {
  test("a RunHandle over Connect JSON continues with no gap or duplicate after the server it reads from is SIGKILLed and replaced on its ports", async () => {
    const keyPrefix = `ts-${randomUUID()}`;
    // The run executes on `runner`; the client reads it through `front`'s
    // HTTP port, which is killed mid-stream and replaced by a new process on
    // the same gRPC and HTTP ports.
    const httpPort = await freePort();
    const [runner, front] = await Promise.all([
      Keel.start({ redisUrl: redis.url, keyPrefix }),
      Keel.start({ redisUrl: redis.url, keyPrefix, httpPort }),
    ]);
    const runnerClient = new NodeKeelClient(runner.target);
    const client = new KeelClient(front.httpUrl, { ...FAST, protocol: "connect" });
    let replacement: Keel | undefined;
    try {
      // A run that would stream for minutes: the test cancels it once the
      // stream has shown live events from the replacement.
      const run = await runnerClient.startRun("scripted", script({ text: 100_000, delay_ms: 10 }));
      const handle = client.run(run.runId);
      const events: AgentEvent[] = [];
      let resumedAt = -1;
      for await (const event of handle.events()) {
        events.push(event);
        if (events.length === 40) {
          assert.equal(await front.kill(), -1);
          replacement = await Keel.start({
            redisUrl: redis.url,
            keyPrefix,
            port: front.port,
            httpPort,
          });
        } else if (replacement !== undefined && resumedAt < 0) {
          resumedAt = events.length; // the first event after the restart
        } else if (resumedAt > 0 && events.length === resumedAt + 50) {
          await runnerClient.cancelRun(run.runId, { reason: "seen enough" });
        }
      }

      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "abort", "the run should have been live to the end");
      const text = textOf(events);
      assert.equal(
        text,
        deltas(text.split(" ").length - 1),
        "text deltas with a gap or a duplicate",
      );
      assert.ok(handle.reconnects.length > 0, "the stream never reconnected");
      assert.equal(handle.reconnects[0]!.code, Code.Unavailable);
      assert.ok(handle.reconnects[0]!.offset >= 40n);
      assert.ok(handle.reconnects.every((r) => r.rpc === "Observe"));
      const final = await client.getRun(run.runId); // answered by the replacement
      assert.equal(final.state, RunState.CANCELLED);
      assert.equal(final.nextOffset, BigInt(events.length));
      assert.equal(handle.nextOffset, final.nextOffset);
    } finally {
      client.close();
      runnerClient.close();
      await Promise.all([runner.kill(), front.kill(), replacement?.kill()]);
    }
  });

  test("stream() over gRPC-Web continues with no gap or duplicate after the server running the run is SIGKILLed and replaced on its ports", async () => {
    const keyPrefix = `ts-${randomUUID()}`;
    // Short leases: the replacement takes the dead owner's run over within a second or so.
    const env = {
      KEEL_LEASE_TTL_S: "1.0",
      KEEL_SWEEP_INTERVAL_S: "0.2",
      KEEL_HEARTBEAT_INTERVAL_S: "0.2",
    };
    const httpPort = await freePort();
    const owner = await Keel.start({ redisUrl: redis.url, keyPrefix, env, httpPort });
    const client = new KeelClient(owner.httpUrl, { ...FAST, protocol: "grpc-web" });
    let replacement: Keel | undefined;
    try {
      const input = script(
        { text: 200, delay_ms: 10 },
        { tool: "record", args: { key: "k" } },
        { text: 100, delay_ms: 10 },
      );
      const handle = client.stream("scripted", input);
      const events: AgentEvent[] = [];
      for await (const event of handle.events()) {
        events.push(event);
        if (events.length === 40) {
          assert.equal(await owner.kill(), -1);
          replacement = await Keel.start({
            redisUrl: redis.url,
            keyPrefix,
            env,
            port: owner.port,
            httpPort,
          });
        }
      }

      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "finish");
      assert.ok(payloads(events).includes("stepSuperseded"), "the run was not taken over");
      const kept = effective(events);
      assert.ok(textOf(kept).startsWith(deltas(300)));
      assert.equal(payloads(kept).filter((p) => p === "toolResult").length, 1);
      assert.ok(handle.reconnects.length > 0);
      assert.ok(handle.reconnects.every((r) => r.rpc === "Observe"));
      assert.ok(handle.runId);
      const run = await client.getRun(handle.runId);
      assert.equal(run.state, RunState.SUCCEEDED);
      assert.equal(run.nextOffset, BigInt(events.length));
    } finally {
      client.close();
      await Promise.all([owner.kill(), replacement?.kill()]);
    }
  });
});

describe("API keys", { timeout: TEST_TIMEOUT_MS }, () => {
  let dir: string;
  let keel: Keel;
  let key: string;

  before(async () => {
    dir = mkdtempSync(path.join(tmpdir(), "keel-web-keys-"));
    const file = path.join(dir, "keys.jsonl");
    key = await addApiKey(file, "acme", "runner");
    keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `ts-${randomUUID()}`,
      httpPort: await freePort(),
      apiKeysFile: file,
    });
  });

  after(async () => {
    await keel.kill();
    rmSync(dir, { recursive: true, force: true });
  });

  test("a call without the key fails UNAUTHENTICATED, with it (apiKey) works, over every protocol", async () => {
    for (const { name, options } of PROTOCOLS) {
      const anonymous = new KeelClient(keel.httpUrl, { ...FAST, ...options });
      const wrongKey = `keel_${"0".repeat(8)}_${"A".repeat(43)}`;
      const wrong = new KeelClient(keel.httpUrl, { ...FAST, ...options, apiKey: wrongKey });
      const keyed = new KeelClient(keel.httpUrl, { ...FAST, ...options, apiKey: key });
      try {
        await assert.rejects(anonymous.listAgents(), (e) =>
          assertConnectError(e, Code.Unauthenticated),
        );
        await assert.rejects(wrong.listAgents(), (e) =>
          assertConnectError(e, Code.Unauthenticated),
        );
        const handle = anonymous.stream("scripted", script({ text: 3 }));
        await assert.rejects(collect(handle.events()), (e) =>
          assertConnectError(e, Code.Unauthenticated),
        );
        assert.deepEqual(handle.reconnects, [], `${name}: UNAUTHENTICATED is not retried`);

        assert.ok((await keyed.listAgents()).some((agent) => agent.agentId === "scripted"));
        const events = await collect(keyed.stream("scripted", script({ text: 3 })).events());
        assertContiguous(events);
        assert.equal(payloads(events).at(-1), "finish", name);
      } finally {
        anonymous.close();
        wrong.close();
        keyed.close();
      }
    }
  });

  test("the Node client's apiKey too, on the gRPC port", async () => {
    const anonymous = new NodeKeelClient(keel.target, FAST);
    const keyed = new NodeKeelClient(keel.target, { ...FAST, apiKey: key });
    try {
      await assert.rejects(anonymous.listAgents(), (e) =>
        assertConnectError(e, Code.Unauthenticated),
      );
      const run = await keyed.startRun("scripted", script({ text: 3 }));
      const events = await collect(keyed.observeRun(run.runId));
      assert.equal(payloads(events).at(-1), "finish");
    } finally {
      anonymous.close();
      keyed.close();
    }
  });
});

describe("the browser entry point's import graph", () => {
  // This file runs as build/test/web.test.js; the package is two levels up.
  const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
  const builtins = new Set(builtinModules);

  // build/src/web.js: the same compiled code as dist/web.js, built by `npm test` itself.
  for (const entry of ["build/src/web.js"]) {
    test(`${entry} pulls in no Node module`, () => {
      const graph = importGraph(path.join(PACKAGE, entry));
      const offenders = [...graph.specifiers].filter(
        (spec) =>
          spec.startsWith("node:") ||
          builtins.has(spec.split("/")[0]!) ||
          spec === "@connectrpc/connect-node" ||
          spec.startsWith("@connectrpc/connect-node/"),
      );
      assert.deepEqual(offenders, [], `imported by ${graph.importers(offenders)}`);
      // It did walk into the packages: the web transports, Connect, protobuf-es.
      for (const spec of ["@connectrpc/connect-web", "@connectrpc/connect", "@bufbuild/protobuf"]) {
        assert.ok(graph.specifiers.has(spec), `${spec} is not in the graph`);
      }
      assert.ok(graph.files.size > 50, `only ${graph.files.size} files`);
    });
  }

  test("the walk does find Node's modules in the Node entry point", () => {
    const graph = importGraph(path.join(PACKAGE, "build/src/index.js"));
    assert.ok(graph.specifiers.has("@connectrpc/connect-node"));
    assert.ok([...graph.specifiers].some((spec) => spec.startsWith("node:") || builtins.has(spec)));
  });
});

/** Static `import`/`export ... from` (and `import "x"`) at the start of a line; and `import("x")`. */
const IMPORT_FROM =
  /^[ \t]*(?:import|export)\b(?:[\w$\s,*]*|[\w$\s,*]*\{[^}]*\}[\w$\s,*]*)\bfrom[ \t]*["']([^"'\n]+)["']/gm;
const IMPORT_BARE = /^[ \t]*import[ \t]*["']([^"'\n]+)["']/gm;
const IMPORT_DYNAMIC = /\bimport\(\s*["']([^"'\n]+)["']\s*\)/g;
/** The conditions a bundler for browsers matches in a package's "exports", in its order. */
const CONDITIONS = new Set(["browser", "import", "module", "default"]);

interface Graph {
  files: Set<string>;
  specifiers: Set<string>;
  importers(specifiers: string[]): string;
}

/**
 * Every module `entry` imports, transitively: relative files, and bare
 * packages resolved through node_modules as a bundler for browsers would
 * (their "exports" with the browser/import conditions, else "browser",
 * "module" or "main"). Node's own modules are recorded, not followed.
 */
function importGraph(entry: string): Graph {
  const files = new Set<string>();
  const specifiers = new Set<string>();
  const importedBy = new Map<string, string>();
  const queue = [entry];
  while (queue.length > 0) {
    const file = queue.pop()!;
    if (files.has(file)) {
      continue;
    }
    files.add(file);
    const source = readFileSync(file, "utf8");
    const found = [IMPORT_FROM, IMPORT_BARE, IMPORT_DYNAMIC].flatMap((pattern) =>
      [...source.matchAll(pattern)].map((match) => match[1]!),
    );
    for (const spec of found) {
      specifiers.add(spec);
      if (!importedBy.has(spec)) {
        importedBy.set(spec, file);
      }
      if (spec.startsWith("node:") || builtinModules.includes(spec.split("/")[0]!)) {
        continue;
      }
      queue.push(resolve(spec, file));
    }
  }
  return {
    files,
    specifiers,
    importers: (specs) => specs.map((s) => `${s}: ${importedBy.get(s)}`).join(", "),
  };
}

function resolve(spec: string, from: string): string {
  if (spec.startsWith("./") || spec.startsWith("../") || spec.startsWith("/")) {
    return asFile(path.resolve(path.dirname(from), spec), spec, from);
  }
  const parts = spec.split("/");
  const name = spec.startsWith("@") ? parts.slice(0, 2).join("/") : parts[0]!;
  const subpath = "." + spec.slice(name.length);
  for (let dir = path.dirname(from); ; dir = path.dirname(dir)) {
    const root = path.join(dir, "node_modules", name);
    if (existsSync(path.join(root, "package.json"))) {
      const manifest = JSON.parse(readFileSync(path.join(root, "package.json"), "utf8"));
      const target = packageTarget(manifest, subpath);
      assert.ok(target !== undefined, `${spec} (imported by ${from}) exports nothing for browsers`);
      return asFile(path.join(root, target), spec, from);
    }
    assert.notEqual(path.dirname(dir), dir, `cannot find package ${name} (imported by ${from})`);
  }
}

function packageTarget(manifest: Record<string, unknown>, subpath: string): string | undefined {
  const exports = manifest.exports;
  if (exports !== undefined) {
    const map =
      typeof exports === "string" ||
      Array.isArray(exports) ||
      !Object.keys(exports as object).some((k) => k.startsWith("."))
        ? { ".": exports }
        : (exports as Record<string, unknown>);
    if (subpath in map) {
      return conditional(map[subpath]);
    }
    for (const [pattern, value] of Object.entries(map)) {
      const star = pattern.indexOf("*");
      if (
        star >= 0 &&
        subpath.startsWith(pattern.slice(0, star)) &&
        subpath.endsWith(pattern.slice(star + 1))
      ) {
        const matched = subpath.slice(star, subpath.length - (pattern.length - star - 1));
        return conditional(value)?.replaceAll("*", matched);
      }
    }
    return undefined;
  }
  if (subpath !== ".") {
    return subpath;
  }
  const browser = manifest.browser;
  for (const field of [
    typeof browser === "string" ? browser : undefined,
    manifest.module,
    manifest.main,
  ]) {
    if (typeof field === "string") {
      return field;
    }
  }
  return "index.js";
}

/** The target of an "exports" value under CONDITIONS: the first key that matches, in the object's order. */
function conditional(value: unknown): string | undefined {
  if (typeof value === "string") {
    return value;
  }
  if (Array.isArray(value)) {
    for (const item of value) {
      const target = conditional(item);
      if (target !== undefined) {
        return target;
      }
    }
    return undefined;
  }
  if (value !== null && typeof value === "object") {
    for (const [key, nested] of Object.entries(value)) {
      if (CONDITIONS.has(key)) {
        const target = conditional(nested);
        if (target !== undefined) {
          return target;
        }
      }
    }
  }
  return undefined;
}

function asFile(candidate: string, spec: string, from: string): string {
  for (const file of [candidate, `${candidate}.js`, path.join(candidate, "index.js")]) {
    if (existsSync(file) && statSync(file).isFile()) {
      return file;
    }
  }
  assert.fail(`cannot resolve ${spec} (imported by ${from})`);
}
