/**
 * Errors of the Keel client, and how it reads the errors of the server.
 *
 * - `ConnectError` (from @connectrpc/connect): every failed call. `code` is
 *   the gRPC status; `errorInfo(error)` decodes the `google.rpc.ErrorInfo`
 *   Keel puts in the status details (reason and metadata).
 * - `StreamContractError`: the server broke the stream contract (a gap in
 *   the event indices, a message before the snapshot, a snapshot of another
 *   run). Never retried: it is a bug, and resuming would hide lost events.
 * - `ClientClosedError`: the `KeelClient` was closed while a call was open.
 * - `LogRolledBack`: the run's store lost events the client already received
 *   (FAILED_PRECONDITION, reason LOG_ROLLED_BACK). Never retried: resuming
 *   would mix two histories.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

export class StreamContractError extends Error {
  override name = "StreamContractError";
}

export class ClientClosedError extends Error {
  override name = "ClientClosedError";
  constructor() {
    super("the KeelClient was closed");
  }
}

/**
 * The run's store lost events this client already received.
 *
 * The store came back with an older state (a Redis restart from old files,
 * a failover to a replica that lagged) and carried on from there, so some
 * indices the client has seen now hold other events, or do not exist yet.
 * The server answered Observe with FAILED_PRECONDITION (LOG_ROLLED_BACK);
 * `cause` is that ConnectError. Never retried: resuming would mix two
 * histories.
 *
 * What to do: the events the client holds from `divergedAt` on (all of them
 * when it is undefined) are not the run's any more. Discard them and read the
 * run again from `divergedAt` (`handle.events({ fromOffset: divergedAt })`),
 * or from 0 when `divergedAt` is undefined.
 */
export class LogRolledBack extends Error {
  override name = "LogRolledBack";
  /** The run. */
  readonly runId: string;
  /** The offset the client resumed at: it holds events up to offset - 1. */
  readonly offset: bigint;
  /** The log's head now. */
  readonly nextOffset: bigint;
  /** The incarnation the client sent: the store's life that wrote the last event it holds. */
  readonly incarnation: string;
  /** The first index whose event the client holds but the log no longer has; undefined: unknown. */
  readonly divergedAt: bigint | undefined;

  constructor(
    runId: string,
    offset: bigint,
    nextOffset: bigint,
    incarnation: string,
    divergedAt: bigint | undefined,
    options?: { cause?: unknown },
  ) {
    const where = divergedAt === undefined ? "at an unknown index" : `from index ${divergedAt} on`;
    const again = divergedAt ?? 0n;
    super(
      `run ${JSON.stringify(runId)}: the store lost events this client already received: ` +
        `it holds events up to ${offset - 1n} (incarnation ${JSON.stringify(incarnation)}), ` +
        `but the log's head is now ${nextOffset} and its history differs ${where}. ` +
        `Discard the events held from index ${again} on and read the run again from there ` +
        `(events({ fromOffset: ${again} }))`,
      options,
    );
    this.runId = runId;
    this.offset = offset;
    this.nextOffset = nextOffset;
    this.incarnation = incarnation;
    this.divergedAt = divergedAt;
  }

  /**
   * `error` as a LogRolledBack if it is a ConnectError FAILED_PRECONDITION
   * whose ErrorInfo has reason LOG_ROLLED_BACK, else undefined. Metadata the
   * server left out falls back to what the client sent (`sent`; the head to
   * the offset).
   */
  static from(
    error: unknown,
    sent: { runId: string; offset: bigint; incarnation: string },
  ): LogRolledBack | undefined {
    if (!(error instanceof ConnectError) || error.code !== Code.FailedPrecondition) {
      return undefined;
    }
    const info = errorInfo(error);
    if (info?.reason !== "LOG_ROLLED_BACK") {
      return undefined;
    }
    const { metadata } = info;
    const offset = parseIndex(metadata.offset) ?? sent.offset;
    return new LogRolledBack(
      metadata.run_id || sent.runId,
      offset,
      parseIndex(metadata.next_offset) ?? offset,
      metadata.incarnation ?? sent.incarnation,
      parseIndex(metadata.diverged_at),
      { cause: error },
    );
  }
}

/** An index in ErrorInfo metadata (decimal text), or undefined if absent or malformed. */
function parseIndex(text: string | undefined): bigint | undefined {
  return text !== undefined && /^-?\d+$/.test(text) ? BigInt(text) : undefined;
}

/**
 * Whether a failed call means "the server is unavailable": the one failure
 * worth retrying (the stream resumes at its next offset, on this or another
 * replica). Any other status is the server's answer and is surfaced as is.
 *
 * True for status UNAVAILABLE (a draining server, an unreachable store, a
 * refused connection), and for a connection that broke before the server
 * sent any status. gRPC's own clients report that as UNAVAILABLE too, but
 * Node's HTTP/2 transport reports a session that died under an open stream
 * as CANCELED (RST_STREAM CANCEL), a reset socket as ABORTED (ECONNRESET) and
 * a stream reset by the peer as INTERNAL; a status sent by the server always
 * comes with a `grpc-status` header or trailer, so these are told apart by
 * its absence. The caller's own AbortSignal is checked before this.
 */
export function isUnavailable(error: unknown): boolean {
  if (!(error instanceof ConnectError)) {
    return false;
  }
  if (error.code === Code.Unavailable) {
    return true;
  }
  if (error.metadata.has("grpc-status")) {
    return false; // the server's answer
  }
  return (
    error.code === Code.Canceled ||
    error.code === Code.Aborted ||
    (error.code === Code.Internal && error.rawMessage.startsWith("http/2 stream closed"))
  );
}

/**
 * `isUnavailable()` for calls over fetch (Connect and gRPC-Web: the KeelClient
 * of "@keel/client/web", which exports it as `isUnavailable`).
 *
 * True for status UNAVAILABLE (sent by the server, or an HTTP 502, 503 or
 * 504 from a proxy), and for a connection that failed before the server's
 * status arrived: fetch rejects (refused, reset; in a browser also a request
 * the page's CORS policy refused, which looks the same to the page), the
 * response body breaks off (fetch's reader throws a TypeError), or it ends
 * without the stream's last message (Connect's end of stream, gRPC-Web's
 * trailers) or inside a message. Connect sends the server's errors in the
 * body, without a `grpc-status` header, so unlike isUnavailable() a
 * CANCELED, ABORTED or INTERNAL status is the server's answer here.
 */
export function isUnavailableOverFetch(error: unknown): boolean {
  if (!(error instanceof ConnectError)) {
    return false;
  }
  if (error.code === Code.Unavailable) {
    return true;
  }
  const cause = error.cause;
  if (cause instanceof TypeError) {
    return true; // fetch() or its body's reader: the network failed
  }
  if (typeof cause === "string") {
    // What Connect's fetch transports throw for a body that ended too soon.
    return BODY_CUT_SHORT.has(cause);
  }
  return (
    error.code === Code.InvalidArgument &&
    error.rawMessage === "protocol error: incomplete envelope" // cut inside a message
  );
}

const BODY_CUT_SHORT = new Set([
  "missing EndStreamResponse",
  "missing trailer",
  "missing response body",
]);

/** A `google.rpc.ErrorInfo`: why a call failed, in a form to branch on. */
export interface ErrorInfo {
  /** UPPER_SNAKE, e.g. "RUN_NOT_FOUND", "OFFSET_EXPIRED", "SERVER_DRAINING". */
  reason: string;
  /** "keel.dev" for Keel's own errors. */
  domain: string;
  /** Every dynamic value of the error, e.g. run_id, earliest_offset, next_offset. */
  metadata: Record<string, string>;
}

/**
 * The `google.rpc.ErrorInfo` in a failed call's status details, if any.
 *
 *     catch (error) {
 *       if (errorInfo(error)?.reason === "OFFSET_EXPIRED") { ... }
 *     }
 */
export function errorInfo(error: unknown): ErrorInfo | undefined {
  if (!(error instanceof ConnectError)) {
    return undefined;
  }
  for (const detail of error.details) {
    if ("type" in detail && detail.type === "google.rpc.ErrorInfo") {
      return decodeErrorInfo(detail.value);
    }
  }
  return undefined;
}

/** Decodes ErrorInfo{reason = 1, domain = 2, map<string, string> metadata = 3}. */
function decodeErrorInfo(bytes: Uint8Array): ErrorInfo {
  const info: ErrorInfo = { reason: "", domain: "", metadata: {} };
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (wireType !== WireType.LengthDelimited) {
      reader.skip(wireType, field);
    } else if (field === 1) {
      info.reason = reader.string();
    } else if (field === 2) {
      info.domain = reader.string();
    } else if (field === 3) {
      const [key, value] = decodeStringMapEntry(reader.bytes());
      info.metadata[key] = value;
    } else {
      reader.skip(wireType, field);
    }
  }
  return info;
}

/** A map<string, string> entry: message {string key = 1; string value = 2}. */
function decodeStringMapEntry(bytes: Uint8Array): [string, string] {
  let key = "";
  let value = "";
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (wireType === WireType.LengthDelimited && field === 1) {
      key = reader.string();
    } else if (wireType === WireType.LengthDelimited && field === 2) {
      value = reader.string();
    } else {
      reader.skip(wireType, field);
    }
  }
  return [key, value];
}
