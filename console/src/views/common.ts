/** Pieces several views share: state badges, paging, run links. */
import { RunState, TaskStatus } from "@keel/client/web";
import { href } from "../context.js";
import { h } from "../dom.js";
import { enumName, formatTime, shortId, type TimestampLike } from "../format.js";

export function stateName(state: RunState): string {
  return enumName(RunState, state);
}

export function stateBadge(state: RunState, testid = "state"): HTMLElement {
  const name = stateName(state);
  return h("span", { class: `badge state-${name.toLowerCase()}`, "data-testid": testid }, name);
}

export function taskStatusBadge(status: TaskStatus): HTMLElement {
  const name = enumName(TaskStatus, status);
  return h(
    "span",
    { class: `badge task-${name.toLowerCase()}`, "data-testid": "task-status" },
    name,
  );
}

/** A time for a table cell (kept on one line). */
export function when(ts: TimestampLike | undefined): HTMLElement {
  return h("span", { class: "time" }, formatTime(ts));
}

export function runLink(runId: string, short = false): HTMLElement {
  if (runId === "") {
    return h("span", null, "");
  }
  return h(
    "a",
    { href: href("runs", [runId]), class: "mono", title: runId },
    short ? shortId(runId) : runId,
  );
}

export function threadLink(threadId: string): HTMLElement {
  if (threadId === "") {
    return h("span", null, "");
  }
  return h("a", { href: href("threads", [threadId]), class: "mono" }, threadId);
}

/**
 * Page tokens of a paged list, per filter: page n's token is pages[n] (page 0's is "").
 * Kept for the tab's life, so Previous works; a page number it has no token for
 * (after a reload) is page 0.
 */
const tokens = new Map<string, string[]>();

export interface Paging {
  /** The page shown, from 0. */
  page: number;
  /** The token to ask for it with. */
  token: string;
  /** Remembers the next page's token; returns whether there is one. */
  setNext(nextPageToken: string): boolean;
}

export function paging(list: string, filterKey: string, query: URLSearchParams): Paging {
  const key = `${list}?${filterKey}`;
  let pages = tokens.get(key);
  if (pages === undefined) {
    pages = [""];
    tokens.set(key, pages);
  }
  const asked = Number(query.get("page") ?? "0");
  const page = Number.isInteger(asked) && asked >= 0 && asked < pages.length ? asked : 0;
  const known = pages;
  return {
    page,
    token: known[page] ?? "",
    setNext(nextPageToken: string): boolean {
      if (nextPageToken === "") {
        known.length = page + 1;
        return false;
      }
      known[page + 1] = nextPageToken;
      return true;
    },
  };
}

/** Previous / page n / Next buttons that go to `page` with the same filters. */
export function pager(
  testid: string,
  page: number,
  hasNext: boolean,
  go: (page: number) => void,
): HTMLElement {
  return h(
    "div",
    { class: "pager", "data-testid": testid },
    h(
      "button",
      {
        type: "button",
        id: `${testid}-prev`,
        "data-testid": `${testid}-prev`,
        disabled: page === 0,
        onclick: () => go(page - 1),
      },
      "← Previous",
    ),
    h("span", { "data-testid": `${testid}-page` }, `page ${page + 1}`),
    h(
      "button",
      {
        type: "button",
        id: `${testid}-next`,
        "data-testid": `${testid}-next`,
        disabled: !hasNext,
        onclick: () => go(page + 1),
      },
      "Next →",
    ),
  );
}

/** A "loading…" line, replaced by what loads. */
export function loading(): HTMLElement {
  return h("p", { class: "muted", "data-testid": "loading" }, "loading…");
}

/** The query without empty values, as a record for navigate(). */
export function queryRecord(
  query: URLSearchParams,
  changes: Record<string, string> = {},
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [key, value] of query) {
    out[key] = value;
  }
  for (const [key, value] of Object.entries(changes)) {
    out[key] = value;
  }
  return out;
}
