/**
 * @keel/client/web: the Keel client for browsers (and any runtime with fetch
 * and WHATWG streams: Deno, Bun, Node 20+). The same KeelClient as
 * "@keel/client" (core.ts: every helper, and RunHandle's event streams that
 * resume by themselves, exactly once and in order), the same generated
 * keel.v1 messages, errors and types, over Connect's fetch transports
 * (@connectrpc/connect-web) instead of gRPC on HTTP/2. Nothing here imports
 * a Node module.
 *
 *     import { KeelClient } from "@keel/client/web";
 *
 *     const client = new KeelClient("https://keel.example.com:8080", { apiKey });
 *     const handle = client.stream("assistant", "hello");
 *     for await (const event of handle.events()) { ... } // resumes across dropped connections
 *     client.close();
 *
 * `baseUrl` is the URL of Keel's HTTP port (`python -m server serve
 * --http-port P`), which serves the Connect protocol (JSON and binary) and
 * gRPC-Web at /keel.v1.AgentService/<Method>; "host:port" means
 * "http://host:port", and a path ("/keel") a URL of the page's own origin.
 * A page of another origin needs that origin in the server's
 * KEEL_HTTP_CORS_ORIGINS.
 *
 * Options: those of every KeelClient (`apiKey`, sent with every call as
 * `authorization: Bearer <key>`; initialBackoffMs, maxBackoffMs,
 * maxReconnects, stallTimeoutMs; `transport`), and for the default
 * transport:
 *
 * - `protocol`: "connect" (the default; `createConnectTransport`) or
 *   "grpc-web" (`createGrpcWebTransport`).
 * - `binary`: protobuf's binary encoding instead of JSON. Default false for
 *   Connect (JSON is readable in the browser's network panel) and true for
 *   gRPC-Web (its usual encoding).
 *
 * close() cancels every open call (streams end with ClientClosedError, unary
 * calls reject with it) and refuses later ones; fetch keeps no connection of
 * the client's own to close. A call whose connection fails (fetch rejects,
 * the body breaks off or ends too soon: `isUnavailable()`) fails with
 * UNAVAILABLE, which Connect would report as UNKNOWN; a stream that does, or
 * stays silent past `stallTimeoutMs`, resumes at its next offset, as in
 * Node. A server's other answers are thrown as ConnectError, never retried.
 * Keel's RPCs are unary or server-streaming, so HTTP/1.1 is enough.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { createConnectTransport, createGrpcWebTransport } from "@connectrpc/connect-web";
import { KeelClientBase, cancelledOnClose, type KeelClientBaseOptions } from "./core.js";
import { isUnavailableOverFetch } from "./errors.js";

export interface KeelClientOptions extends KeelClientBaseOptions {
  /**
   * The transport to use instead of the default (Connect or gRPC-Web over
   * fetch, as `protocol` says). The caller owns it; close() still cancels
   * the calls made through this client. Its failures are read with
   * isUnavailable() (of this module).
   */
  transport?: KeelClientBaseOptions["transport"];
  /** The protocol of the default transport: "connect" (the default) or "grpc-web". */
  protocol?: "connect" | "grpc-web";
  /** Protobuf's binary encoding instead of JSON. Default: false for "connect", true for "grpc-web". */
  binary?: boolean;
}

/**
 * A connection to one Keel server's HTTP port (or a proxy in front of
 * many) from a browser. See the module's header.
 */
export class KeelClient extends KeelClientBase {
  /** The protocol of the calls: the default transport's, or "custom" for a transport passed in. */
  readonly protocol: "connect" | "grpc-web" | "custom";

  constructor(baseUrl: string, options: KeelClientOptions = {}) {
    const protocol = options.protocol ?? "connect";
    if (protocol !== "connect" && protocol !== "grpc-web") {
      throw new TypeError(`protocol must be "connect" or "grpc-web", got ${String(protocol)}`);
    }
    const url = webBaseUrl(baseUrl);
    super(url, options, (closed) => {
      const transport =
        options.transport ??
        (protocol === "grpc-web"
          ? createGrpcWebTransport({ baseUrl: url, useBinaryFormat: options.binary ?? true })
          : createConnectTransport({ baseUrl: url, useBinaryFormat: options.binary ?? false }));
      return {
        transport: cancelledOnClose(transport, closed, asUnavailable),
        isUnavailable: isUnavailableOverFetch,
      };
    });
    this.protocol = options.transport === undefined ? protocol : "custom";
  }
}

/**
 * A failure of the connection (isUnavailable()) as the UNAVAILABLE it is:
 * Connect reports a fetch that failed, or a body that broke off, as UNKNOWN
 * (or INVALID_ARGUMENT, a body cut inside a message); callers, and each
 * Reconnect's `code`, see UNAVAILABLE as gRPC's clients report it.
 */
function asUnavailable(error: unknown): unknown {
  if (!(error instanceof ConnectError) || error.code === Code.Unavailable) {
    return error;
  }
  if (!isUnavailableOverFetch(error)) {
    return error;
  }
  return new ConnectError(
    error.rawMessage,
    Code.Unavailable,
    error.metadata,
    undefined,
    error.cause,
  );
}

/** "http(s)://..." and "/path" as given (without a trailing slash); "host:port" as "http://host:port". */
function webBaseUrl(baseUrl: string): string {
  if (baseUrl === "") {
    throw new TypeError("baseUrl must not be empty");
  }
  const url =
    /^[a-z][a-z0-9+.-]*:\/\//i.test(baseUrl) || baseUrl.startsWith("/")
      ? baseUrl
      : `http://${baseUrl}`;
  return url.replace(/\/+$/, "");
}

export * from "./common.js";
export { isUnavailableOverFetch as isUnavailable } from "./errors.js";
