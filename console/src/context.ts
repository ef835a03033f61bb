/** What every view gets from the router. */
import type { KeelClient } from "@keel/client/web";

export interface ViewContext {
  /** The element the view renders into (emptied before the view starts). */
  readonly root: HTMLElement;
  /** The route's path after its name: ["<run id>"] for #/runs/<run id>. */
  readonly path: string[];
  /** The route's query: #/runs?agent=scripted&state=SUSPENDED. */
  readonly query: URLSearchParams;
  /** The client (a new one after the operator typed an API key: read it at each call). */
  readonly client: KeelClient;
  /** Aborted when the view is left: pass it to streams and ignore what fails after it. */
  readonly signal: AbortSignal;
  /** Shows an error in the view (or asks for an API key on UNAUTHENTICATED); cancellations are ignored. */
  fail(error: unknown): void;
  /** Hides the error fail() showed (a view that polls, once a call worked again). */
  clearError(): void;
  /** Goes to another route: navigate("runs", ["<id>"], { agent: "x" }). */
  navigate(name: string, path?: string[], query?: Record<string, string>): void;
}

export type View = (ctx: ViewContext) => void;

/** "#/runs/<id>?a=b" for a route. */
export function href(
  name: string,
  path: string[] = [],
  query: Record<string, string> = {},
): string {
  const params = new URLSearchParams(Object.entries(query).filter(([, value]) => value !== ""));
  const search = params.toString();
  const segments = [name, ...path.map(encodeURIComponent)].join("/");
  return `#/${segments}${search === "" ? "" : `?${search}`}`;
}
