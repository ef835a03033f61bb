/**
 * The exports both entry points share: "." (index.ts, Node) and "./web"
 * (web.ts, browsers) add their own KeelClient and isUnavailable() to these.
 */
export { Code, ConnectError } from "@connectrpc/connect";
export { Backoff, type BackoffOptions } from "./backoff.js";
export {
  KeelClientBase,
  type CreateScheduleOptions,
  type CreateThreadOptions,
  type GoalInit,
  type GoalOptions,
  type HandleOptions,
  type KeelClientBaseOptions,
  type ListRunsFilter,
  type ListScheduleRunsOptions,
  type ListSchedulesFilter,
  type ListTasksFilter,
  type ListThreadMessagesOptions,
  type ListThreadsFilter,
  type ObserveOptions,
  type ResumeOptions,
  type ScheduleChanges,
  type SendMessageOptions,
  type StartOptions,
  type StartRunOptions,
  type ThreadRunOptions,
  type UntilIdleOptions,
} from "./core.js";
export {
  ClientClosedError,
  LogRolledBack,
  StreamContractError,
  errorInfo,
  type ErrorInfo,
} from "./errors.js";
export {
  RunHandle,
  answer,
  approval,
  type AgentServiceClient,
  type DecideOptions,
  type DecisionInit,
  type EventsOptions,
  type Json,
  type OnReconnect,
  type Reconnect,
  type StreamRpc,
} from "./handle.js";
export * from "./gen/keel/v1/agent_service_pb.js";
