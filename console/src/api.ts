/**
 * The console's connection to Keel: @keel/client's browser KeelClient on the
 * page's own origin (the server that serves the console serves the API), with
 * the API key the operator typed, kept in this tab's sessionStorage.
 */
import { Code, ConnectError, KeelClient } from "@keel/client/web";

const KEY_ITEM = "keel.apiKey";

export class Api {
  client: KeelClient;
  readonly baseUrl: string;

  constructor(baseUrl: string) {
    this.baseUrl = baseUrl;
    this.client = this.#connect();
  }

  get apiKey(): string | undefined {
    return sessionStorage.getItem(KEY_ITEM) ?? undefined;
  }

  /** Uses `key` from now on (a new client: the open calls of the old one are cancelled). */
  setApiKey(key: string | undefined): void {
    if (key === undefined || key === "") {
      sessionStorage.removeItem(KEY_ITEM);
    } else {
      sessionStorage.setItem(KEY_ITEM, key);
    }
    this.client.close();
    this.client = this.#connect();
  }

  #connect(): KeelClient {
    const apiKey = this.apiKey;
    return new KeelClient(this.baseUrl, apiKey === undefined ? {} : { apiKey });
  }
}

/** Whether an error says the server wants (other) credentials. */
export function isUnauthenticated(error: unknown): boolean {
  return error instanceof ConnectError && error.code === Code.Unauthenticated;
}

/** Whether an error is the cancellation of a call the console stopped itself. */
export function isCancelled(error: unknown): boolean {
  if (error instanceof ConnectError) {
    return error.code === Code.Canceled;
  }
  return (
    error instanceof Error && (error.name === "AbortError" || error.name === "ClientClosedError")
  );
}

/** What the console shows of an error: "PERMISSION_DENIED: ..." for a ConnectError. */
export function describeError(error: unknown): string {
  if (error instanceof ConnectError) {
    return `${Code[error.code] ?? error.code}: ${error.rawMessage}`;
  }
  return error instanceof Error ? `${error.name}: ${error.message}` : String(error);
}
