/**
 * @keel/client: a TypeScript client for Keel whose event streams resume by themselves.
 *
 * - `KeelClient`: the connection, unary helpers, decisions for suspended
 *   runs, and handles on runs; `observeRun()` for an existing run; threads
 *   (conversations): `createThread()`, `sendMessage()`, `listThreadMessages()`;
 *   background tasks: `getTask()`, `listTasks()`, `cancelTask()`,
 *   `retryTask()` (`untilIdle` makes a run wait for its tasks); goals (`goal`
 *   on `stream()`, `startRun()`, `sendMessage()`); schedules:
 *   `createSchedule()`, `updateSchedule()`, `pauseSchedule()`,
 *   `triggerSchedule()`, `listScheduleRuns()`, ... (`listRuns({ scheduleId })`).
 *   gRPC over HTTP/2 with Node's http2; `apiKey` sends a bearer key.
 *   `KeelClientBase` is the same client without its transport: the type
 *   both this KeelClient and the browser's ("@keel/client/web", web.ts:
 *   Connect or gRPC-Web over fetch, the same exports otherwise) extend.
 * - `RunHandle`: one run's events, yielded exactly once and in order across
 *   dropped connections (reconnect on UNAVAILABLE, resume at `nextOffset`
 *   with the `incarnation` of the store that wrote the events it holds).
 * - `StreamContractError`, `ClientClosedError`, `LogRolledBack` (the run's
 *   store lost events a handle already received), `isUnavailable()`, `errorInfo()`;
 *   Connect's `ConnectError` and `Code`, which every failed call throws.
 * - `Backoff`: the capped exponential backoff with jitter between reconnects.
 * - Every generated message, enum and the `AgentService` descriptor of keel.v1
 *   (`Thread`, `ThreadMessage`, `ThreadBusyPolicy`, `MessageKind`, `Task`,
 *   `TaskUpdate`, `TaskStatus`, `Goal`, `GoalEvaluated`, `Schedule`,
 *   `ScheduleFiring`, `ScheduleThreadMode`, `ScheduleOverlapPolicy`, ...).
 */
export * from "./common.js";
export { KeelClient, type KeelClientOptions } from "./client.js";
export { isUnavailable } from "./errors.js";
