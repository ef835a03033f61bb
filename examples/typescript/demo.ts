/**
 * Keel demo in TypeScript: stream a run, drop the connection mid-stream,
 * resume it on a new connection, prove nothing was lost or repeated.
 *
 *     npm ci --prefix clients/typescript && npm run --prefix clients/typescript build
 *     npm ci --prefix examples/typescript && npm run --prefix examples/typescript build
 *     node examples/typescript/dist/demo.js [TARGET]
 *
 * TARGET (or $KEEL_TARGET) is the server's host:port, 127.0.0.1:50051 by
 * default; the server must run the `scripted` test agent
 * (`python -m server serve --agents server.agents.testing:registry`).
 * Exits 1 unless the events read before and after the drop are exactly
 * 0, 1, ..., n-1, ending with the run's `finish`. The twin of
 * examples/python/demo.py.
 */
import {
  ConnectError,
  KeelClient,
  RunState,
  type AgentEvent,
  type Reconnect,
  type Run,
} from "@keel/client";

const SCRIPT = {
  steps: [
    { text: 40, delay_ms: 20 },
    { tool: "record", args: { key: "demo" } },
    { text: 40, delay_ms: 20 },
  ],
};
const TEXT_DELTAS = 80; // the script's text steps together
const DROP_AFTER_EVENTS = 30;
const TIMEOUT_MS = 60_000;
const MAX_RECONNECTS = 5; // a demo should fail fast when no server answers

/** Prints text deltas as they stream and every other event as an [index kind] line. */
class Printer {
  #midLine = false; // the last thing printed was text without a newline

  text(text: string): void {
    process.stdout.write(text);
    this.#midLine = true;
  }

  line(line: string): void {
    process.stdout.write(this.#midLine ? `\n${line}\n` : `${line}\n`);
    this.#midLine = false;
  }

  event(event: AgentEvent): void {
    const { payload } = event;
    switch (payload.case) {
      case "textDelta":
        this.text(payload.value.delta);
        break;
      case "toolCall":
        this.line(`[${event.index} tool_call ${payload.value.toolName}]`);
        break;
      case "toolResult":
        this.line(`[${event.index} tool_result ${payload.value.resultJson}]`);
        break;
      case "start":
      case "stepStart":
      case "stepFinish":
      case "finish":
      case "error":
      case "abort":
        this.line(`[${event.index} ${payload.case}]`);
        break;
    }
  }
}

const print = new Printer();

function reportReconnect(reconnect: Reconnect): void {
  print.line(
    `-- stream lost (${reconnect.message}); resuming at offset ${reconnect.offset}`,
  );
}

/** Where `got` first departs from `want`, in a line. */
function mismatch(
  name: string,
  got: readonly unknown[],
  want: readonly unknown[],
): string {
  const at = got.findIndex((value, i) => value !== want[i]);
  if (at === -1 || at >= want.length) {
    return `${name}: ${got.length} values, expected ${want.length}`;
  }
  return `${name}: position ${at} holds ${got[at]}, expected ${want[at]} (a gap or a duplicate)`;
}

/** Everything wrong with what the demo saw; empty when the invariant holds. */
function problems(events: AgentEvent[], run: Run, resumedAt: bigint): string[] {
  const found: string[] = [];
  const indices = events.map((e) => e.index);
  const expected = events.map((_, i) => BigInt(i));
  if (indices.some((index, i) => index !== expected[i])) {
    found.push(mismatch("indices", indices, expected));
  }
  if (events.at(-1)?.payload.case !== "finish") {
    found.push("the last event is not `finish`");
  }
  if (
    run.state !== RunState.SUCCEEDED ||
    run.nextOffset !== BigInt(events.length)
  ) {
    found.push(
      `the run is ${RunState[run.state]} with ${run.nextOffset} events, we saw ${events.length}`,
    );
  }
  // The scripted agent numbers its text deltas "t0 ", "t1 ", ... across the whole run.
  const numbers = events
    .map((e) =>
      e.payload.case === "textDelta"
        ? /^t(\d+) $/.exec(e.payload.value.delta)
        : null,
    )
    .filter((match) => match !== null)
    .map((match) => Number(match[1]));
  const want = Array.from({ length: TEXT_DELTAS }, (_, i) => i);
  if (numbers.length !== want.length || numbers.some((n, i) => n !== want[i])) {
    found.push(mismatch("text deltas", numbers, want));
  }
  const toolResults = events.filter(
    (e) => e.payload.case === "toolResult",
  ).length;
  if (toolResults !== 1) {
    found.push(`expected one tool_result, saw ${toolResults}`);
  }
  if (resumedAt !== BigInt(DROP_AFTER_EVENTS)) {
    found.push(`resumed at offset ${resumedAt}, expected ${DROP_AFTER_EVENTS}`);
  }
  return found;
}

async function demo(target: string, signal: AbortSignal): Promise<number> {
  const events: AgentEvent[] = [];
  const options = { maxReconnects: MAX_RECONNECTS };

  // 1. Start a run and read it until we deliberately drop the connection.
  const first = new KeelClient(target, options);
  const handle = first.stream("scripted", JSON.stringify(SCRIPT), {
    onReconnect: reportReconnect,
  });
  try {
    for await (const event of handle.events({ signal })) {
      events.push(event);
      print.event(event);
      if (events.length === DROP_AFTER_EVENTS) {
        break; // leaving the loop cancels the call; the run goes on in the server
      }
    }
  } finally {
    first.close();
  }
  const { runId, nextOffset: resumedAt } = handle;
  if (runId === undefined) {
    console.error("error: the stream ended before its snapshot named the run");
    return 1;
  }
  print.line(
    `-- dropped the connection after ${events.length} events of run ${runId}`,
  );

  // 2. A new connection picks the run up where we left it.
  const second = new KeelClient(target, options);
  let run: Run;
  try {
    print.line(`-- resumed at offset ${resumedAt}`);
    const rest = second.observeRun(runId, {
      fromOffset: resumedAt,
      signal,
      onReconnect: reportReconnect,
    });
    for await (const event of rest) {
      events.push(event);
      print.event(event);
    }
    run = await second.getRun(runId, { signal });
  } finally {
    second.close();
  }

  // 3. Prove nothing was lost or repeated across the drop.
  print.line(`-- ${events.length} events, indices 0..${events.length - 1}`);
  const found = problems(events, run, resumedAt);
  for (const problem of found) {
    console.error(`FAILED: ${problem}`);
  }
  if (found.length === 0) {
    console.log(
      "-- OK: every event exactly once, in order, across the dropped connection",
    );
  }
  return found.length === 0 ? 0 : 1;
}

async function main(): Promise<number> {
  const target =
    process.argv[2] ?? process.env.KEEL_TARGET ?? "127.0.0.1:50051";
  const signal = AbortSignal.timeout(TIMEOUT_MS);
  try {
    return await demo(target, signal);
  } catch (error) {
    if (signal.aborted) {
      console.error(`\nerror: the demo took more than ${TIMEOUT_MS / 1000} s`);
    } else if (error instanceof ConnectError) {
      console.error(`\nerror: ${target}: ${error.message}`);
    } else {
      throw error;
    }
    return 1;
  }
}

process.exitCode = await main();
