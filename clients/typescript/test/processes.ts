/**
 * A real Redis and real Keel servers as subprocesses, for the tests that talk
 * to Keel itself: the client's, and the console's end-to-end tests (which
 * compile this file with theirs). The twin of tests/processes.py and the
 * Redis fixture of tests/conftest.py.
 *
 * - Redis: Debian's redis-server (or $KEEL_REDIS_SERVER) on a free port,
 *   without persistence; set KEEL_TEST_REDIS_URL to use one you started.
 * - Keel: `python -m server serve` from the repository root, with the
 *   Python of $KEEL_PYTHON, else the repository's .venv, else python3 on
 *   PATH (scripts/test puts the venv first on PATH).
 *
 * Every process started here is SIGKILLed by stopAll(), and by an exit hook
 * if the test process dies first.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository's root: the first folder above this file that holds the server. */
export const ROOT = repositoryRoot(path.dirname(fileURLToPath(import.meta.url)));
const READY = /^keel listening on (\S+):(\d+)$/m;
const HTTP_READY = /^keel http listening on (\S+):(\d+)$/m;
const START_TIMEOUT_MS = 30_000;
const LOG_LIMIT = 64 * 1024;

const started = new Set<ChildProcess>();
process.on("exit", () => {
  for (const child of started) {
    child.kill("SIGKILL");
  }
});

function repositoryRoot(from: string): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    if (existsSync(path.join(dir, "server", "__main__.py"))) {
      return dir;
    }
    if (path.dirname(dir) === dir) {
      throw new Error(`no Keel repository above ${from}`);
    }
  }
}

function python(): string {
  const venv = path.join(ROOT, ".venv", "bin", "python");
  return process.env.KEEL_PYTHON ?? (existsSync(venv) ? venv : "python3");
}

function redisServer(): string {
  return (
    process.env.KEEL_REDIS_SERVER ??
    (existsSync("/usr/bin/redis-server") ? "/usr/bin/redis-server" : "redis-server")
  );
}

/** A free TCP port on 127.0.0.1 (free now: someone may take it before it is used). */
export async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", resolve);
  });
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}

/** A subprocess that keeps the tail of its output for error messages. */
export class Subprocess {
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  #log = "";

  constructor(command: string, args: string[], env: Record<string, string> = {}) {
    this.child = spawn(command, args, {
      cwd: ROOT,
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    started.add(this.child);
    const keep = (chunk: Buffer): void => {
      this.#log = (this.#log + chunk.toString()).slice(-LOG_LIMIT);
    };
    this.child.stdout?.on("data", keep);
    this.child.stderr?.on("data", keep);
    this.exited = new Promise((resolve) => {
      this.child.once("exit", (code, signal) => {
        started.delete(this.child);
        resolve(code ?? (signal === null ? null : -1));
      });
      this.child.once("error", () => {
        started.delete(this.child);
        resolve(null);
      });
    });
  }

  get log(): string {
    return this.#log;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** Waits until `pattern` appears in the output; fails if the process exits or time runs out. */
  async waitFor(pattern: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const match = this.#log.match(pattern);
      if (match !== null) {
        return match;
      }
      if (!this.running) {
        throw new Error(`${this.child.spawnfile} exited before printing ${pattern}:\n${this.#log}`);
      }
      if (Date.now() > deadline) {
        throw new Error(
          `${this.child.spawnfile} did not print ${pattern} within ${timeoutMs} ms:\n${this.#log}`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  /** Sends `signal` and waits (bounded) for the exit; SIGKILL if it does not come. */
  async stop(signal: NodeJS.Signals = "SIGKILL", timeoutMs = 15_000): Promise<number | null> {
    if (this.running) {
      this.child.kill(signal);
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<"late">((resolve) => {
      timer = setTimeout(() => resolve("late"), timeoutMs);
    });
    const result = await Promise.race([this.exited, late]);
    clearTimeout(timer);
    if (result === "late") {
      this.child.kill("SIGKILL");
      return this.exited;
    }
    return result;
  }
}

/** A Redis of the tests' own. */
export class Redis {
  constructor(
    readonly url: string,
    readonly process: Subprocess | undefined,
  ) {}

  static async start(): Promise<Redis> {
    const external = process.env.KEEL_TEST_REDIS_URL;
    if (external) {
      return new Redis(external, undefined);
    }
    let lastError: unknown;
    for (let attempt = 0; attempt < 3; attempt++) {
      // The free port may be taken before redis binds it: try again.
      const port = await freePort();
      // prettier-ignore
      const redis = new Subprocess(redisServer(), [
        "--port", String(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--daemonize", "no",
      ]);
      try {
        await redis.waitFor(/Ready to accept connections/, 10_000);
        await ping(port);
        return new Redis(`redis://127.0.0.1:${port}/0`, redis);
      } catch (error) {
        lastError = error;
        await redis.stop();
      }
    }
    throw new Error(`could not start redis-server: ${String(lastError)}`);
  }

  async stop(): Promise<void> {
    await this.process?.stop("SIGKILL");
  }
}

async function ping(port: number): Promise<void> {
  const socket = net.connect(port, "127.0.0.1");
  try {
    const reply = await new Promise<string>((resolve, reject) => {
      socket.once("error", reject);
      socket.once("data", (data) => resolve(data.toString()));
      socket.write("PING\r\n");
    });
    if (!reply.startsWith("+PONG")) {
      throw new Error(`redis answered ${JSON.stringify(reply)} to PING`);
    }
  } finally {
    socket.destroy();
  }
}

export interface KeelOptions {
  redisUrl: string;
  keyPrefix: string;
  /** 0 (the default) for any free port; a port a killed server had, to replace it. */
  port?: number;
  /** Also serve Connect, gRPC-Web, SSE and the console over HTTP on this port
   * (--http-port): 0 for any free port, a port a killed server had to replace it. */
  httpPort?: number;
  /** Require API keys from this file (--api-keys-file; see addApiKey). */
  apiKeysFile?: string;
  env?: Record<string, string>;
}

/** One `python -m server serve` process with the scripted test agent. */
export class Keel {
  constructor(
    readonly process: Subprocess,
    readonly port: number,
    readonly httpPort?: number,
  ) {}

  get target(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** The URL of the HTTP port (started with httpPort). */
  get httpUrl(): string {
    if (this.httpPort === undefined) {
      throw new Error("this server was started without an HTTP port");
    }
    return `http://127.0.0.1:${this.httpPort}`;
  }

  static async start(options: KeelOptions): Promise<Keel> {
    // prettier-ignore
    const keel = new Subprocess(python(), [
      "-m", "server", "serve",
      "--port", String(options.port ?? 0),
      "--redis-url", options.redisUrl,
      "--key-prefix", options.keyPrefix,
      "--agents", "server.agents.testing:registry",
      ...(options.httpPort === undefined ? [] : ["--http-port", String(options.httpPort)]),
      ...(options.apiKeysFile === undefined ? [] : ["--api-keys-file", options.apiKeysFile]),
    ], { PYTHONUNBUFFERED: "1", ...options.env });
    try {
      const match = await keel.waitFor(READY, START_TIMEOUT_MS);
      // Printed before READY when the server has an HTTP port.
      const http = options.httpPort === undefined ? null : keel.log.match(HTTP_READY);
      if (options.httpPort !== undefined && http === null) {
        throw new Error(`the server printed no ${HTTP_READY}:\n${keel.log}`);
      }
      return new Keel(keel, Number(match[2]), http === null ? undefined : Number(http[2]));
    } catch (error) {
      await keel.stop();
      throw error;
    }
  }

  /** SIGKILL: the crash. */
  kill(): Promise<number | null> {
    return this.process.stop("SIGKILL");
  }

  /** SIGTERM: the graceful shutdown (streams end with UNAVAILABLE); bounded, then SIGKILL. */
  terminate(timeoutMs = 30_000): Promise<number | null> {
    return this.process.stop("SIGTERM", timeoutMs);
  }
}

/** Adds an API key to a keys file (`python -m server keys add`); returns the key. */
export async function addApiKey(file: string, tenant: string, role: string): Promise<string> {
  // prettier-ignore
  const keys = new Subprocess(python(), [
    "-m", "server", "keys", "add", "--file", file, "--tenant", tenant, "--role", role,
  ]);
  const code = await keys.exited;
  const key = keys.log.match(/^(keel_\S+)/m);
  if (code !== 0 || key === null) {
    throw new Error(`server keys add failed (${code}):\n${keys.log}`);
  }
  return key[1]!;
}

/** SIGKILLs every process this module started that still runs. */
export async function stopAll(): Promise<void> {
  const running = [...started];
  for (const child of running) {
    child.kill("SIGKILL");
  }
  await Promise.all(
    running.map(
      (child) =>
        new Promise((resolve) =>
          child.exitCode !== null || child.signalCode !== null
            ? resolve(null)
            : child.once("exit", resolve),
        ),
    ),
  );
}
