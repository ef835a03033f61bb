/**
 * KeelClient for Node: KeelClientBase (core.ts: every helper, and event
 * streams that resume by themselves) over gRPC on HTTP/2 with Node's http2
 * module, which talks to Keel's gRPC port directly.
 *
 *     const client = new KeelClient("127.0.0.1:50051");
 *     const handle = client.stream("scripted", '{"steps": [{"text": 5}]}');
 *     for await (const event of handle.events()) { ... }
 *     client.close();
 *
 * See core.ts for the rest of the API (threads, tasks, goals, schedules),
 * and web.ts for the browser's KeelClient ("@keel/client/web").
 */
import {
  Http2SessionManager,
  createGrpcTransport,
  type Http2SessionOptions,
} from "@connectrpc/connect-node";
import { KeelClientBase, type KeelClientBaseOptions } from "./core.js";
import { isUnavailable } from "./errors.js";

export interface KeelClientOptions extends KeelClientBaseOptions {
  /**
   * The transport to use instead of the default: gRPC over HTTP/2
   * (cleartext, or TLS for an https:// target) with Node's http2 module.
   * The caller owns a transport it passes in; close() does not close it.
   */
  transport?: KeelClientBaseOptions["transport"];
  /** HTTP/2 keepalive and idle options of the default transport. */
  http2?: Http2SessionOptions;
}

/**
 * A connection to one Keel server (or a load balancer in front of many).
 *
 * `target` is "host:port" (cleartext HTTP/2) or a URL: "http://host:port",
 * "https://host:port". close() cancels the open calls and closes the
 * connection; it is safe to call more than once. An idle connection does not
 * keep Node's event loop alive.
 */
export class KeelClient extends KeelClientBase {
  constructor(target: string, options: KeelClientOptions = {}) {
    const baseUrl = /^https?:\/\//.test(target) ? target : `http://${target}`;
    super(baseUrl, options, () => {
      if (options.transport !== undefined) {
        return { transport: options.transport, isUnavailable };
      }
      const sessionManager = new Http2SessionManager(baseUrl, options.http2);
      return {
        transport: createGrpcTransport({ baseUrl, sessionManager }),
        isUnavailable,
        close: () => sessionManager.abort(),
      };
    });
  }
}
