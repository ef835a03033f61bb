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
