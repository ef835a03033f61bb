/**
 * examples/typescript/demo.ts runs against a real Keel server and proves its
 * invariant (scripts/test builds it first; see its header for the steps).
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync } from "node:fs";
import * as path from "node:path";
import { after, test } from "node:test";
import { Keel, ROOT, Redis, Subprocess, stopAll } from "./processes.js";

const DEMO = path.join(ROOT, "examples", "typescript", "dist", "demo.js");

after(async () => {
  await stopAll();
});

test(
  "the TypeScript example streams a run, drops it, resumes it and sees every event once",
  {
    timeout: 90_000,
    skip: existsSync(DEMO) ? false : "examples/typescript is not built (npm run build there)",
  },
  async () => {
    const redis = await Redis.start();
    const keel = await Keel.start({ redisUrl: redis.url, keyPrefix: `ts-${randomUUID()}` });
    const demo = new Subprocess(process.execPath, [DEMO, keel.target]);
    const code = await Promise.race([
      demo.exited,
      new Promise((resolve) => setTimeout(() => resolve("timeout"), 70_000).unref()),
    ]);
    assert.equal(code, 0, `the demo exited with ${String(code)}:\n${demo.log}`);
    assert.match(demo.log, /-- resumed at offset 30/);
    assert.match(demo.log, /-- OK: every event exactly once/);
  },
);
