/** #/threads: threads, newest first; #/threads/<id>: a thread and its messages. */
import { MessageKind, type MessagePart, type Thread, type ThreadMessage } from "@keel/client/web";
import { href, type ViewContext } from "../context.js";
import { h, replace, table, td } from "../dom.js";
import { compactJson, enumName, formatTime } from "../format.js";
import { loading, pager, paging, queryRecord, runLink, when } from "./common.js";

const PAGE_SIZE = 25;
const MESSAGES_PAGE_SIZE = 50;

export function threadsView(ctx: ViewContext): void {
  const resource = ctx.query.get("resource") ?? "";
  const pages = paging("threads", resource, ctx.query);
  const resourceInput = h("input", {
    id: "filter-resource",
    "data-testid": "filter-resource",
    placeholder: "resource id",
    value: resource,
  });
  const list = h("div", { id: "threads-list" }, loading());
  replace(
    ctx.root,
    h("h1", null, "Threads"),
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (event: Event) => {
          event.preventDefault();
          ctx.navigate("threads", [], { resource: resourceInput.value.trim() });
        },
      },
      h("label", null, "Resource ", resourceInput),
      h("button", { type: "submit" }, "Filter"),
    ),
    list,
  );

  ctx.client
    .listThreads(
      { resourceId: resource, pageSize: PAGE_SIZE, pageToken: pages.token },
      { signal: ctx.signal },
    )
    .then((response) => {
      const hasNext = pages.setNext(response.nextPageToken);
      replace(
        list,
        response.threads.length === 0
          ? h("p", { class: "muted", "data-testid": "threads-empty" }, "No threads.")
          : table(
              "threads-table",
              ["thread", "resource", "messages", "active run", "queued", "created", "updated"],
              response.threads.map(threadRow),
            ),
        pager("threads-pager", pages.page, hasNext, (page) =>
          ctx.navigate("threads", [], queryRecord(ctx.query, { page: String(page) })),
        ),
      );
    })
    .catch(ctx.fail);
}

function threadRow(thread: Thread): HTMLTableRowElement {
  return h(
    "tr",
    { "data-testid": "thread-row", "data-thread-id": thread.threadId },
    td(h("a", { href: href("threads", [thread.threadId]), class: "mono" }, thread.threadId)),
    td(thread.resourceId),
    td(String(thread.messageCount)),
    td(runLink(thread.activeRunId, true)),
    td(String(thread.queuedRunIds.length)),
    td(when(thread.createTime)),
    td(when(thread.updateTime)),
  );
}

export function threadView(ctx: ViewContext): void {
  const threadId = ctx.path[0]!;
  const pages = paging(`thread-messages:${threadId}`, "", ctx.query);
  const info = h("dl", { class: "info" }, loading());
  const messages = h("div", { id: "thread-messages", "data-testid": "thread-messages" }, loading());
  replace(
    ctx.root,
    h("h1", null, "Thread ", h("span", { class: "mono", "data-testid": "thread-id" }, threadId)),
    h("p", null, h("a", { href: href("runs", [], { thread: threadId }) }, "its runs")),
    info,
    h("h2", null, "Messages"),
    messages,
  );

  ctx.client
    .getThread(threadId, { signal: ctx.signal })
    .then((thread) => {
      const rows: Array<[string, HTMLElement | string]> = [
        ["resource", thread.resourceId],
        ["messages", String(thread.messageCount)],
        ["active run", runLink(thread.activeRunId)],
        ["queued runs", thread.queuedRunIds.join(", ")],
        ["created", formatTime(thread.createTime)],
        ["updated", formatTime(thread.updateTime)],
        ...Object.entries(thread.metadata).map(([key, value]): [string, string] => [
          `metadata ${key}`,
          value,
        ]),
      ];
      replace(
        info,
        rows
          .filter(([, value]) => (typeof value === "string" ? value : value.textContent) !== "")
          .map(([name, value]) => [h("dt", null, name), h("dd", null, value)]),
      );
    })
    .catch(ctx.fail);

  ctx.client
    .listThreadMessages(
      threadId,
      { pageSize: MESSAGES_PAGE_SIZE, pageToken: pages.token },
      { signal: ctx.signal },
    )
    .then((response) => {
      const hasNext = pages.setNext(response.nextPageToken);
      replace(
        messages,
        response.messages.length === 0
          ? h(
              "p",
              { class: "muted" },
              "No messages yet (a run's messages join its thread when it ends).",
            )
          : response.messages.map(messageCard),
        pager("messages-pager", pages.page, hasNext, (page) =>
          ctx.navigate("threads", [threadId], { page: String(page) }),
        ),
      );
    })
    .catch(ctx.fail);
}

function messageCard(message: ThreadMessage): HTMLElement {
  const kind = enumName(MessageKind, message.kind).toLowerCase();
  return h(
    "div",
    {
      class: `card message ${kind}`,
      "data-testid": "thread-message",
      "data-index": String(message.index),
    },
    h(
      "div",
      { class: "card-head muted" },
      `#${message.index} · ${kind} · `,
      runLink(message.runId, true),
      ` · ${formatTime(message.createTime)}`,
    ),
    message.parts.map(partView),
  );
}

function partView(part: MessagePart): HTMLElement {
  const p = part.part;
  switch (p.case) {
    case "userPrompt":
      return h(
        "div",
        { class: "part user" },
        h("span", { class: "label" }, "user"),
        h("pre", null, p.value.text),
      );
    case "text":
      return h("div", { class: "part text" }, h("pre", null, p.value.text));
    case "reasoning":
      return h("div", { class: "part reasoning" }, h("pre", null, p.value.text));
    case "systemPrompt":
      return h(
        "div",
        { class: "part system" },
        h("span", { class: "label" }, "system"),
        h("pre", null, p.value.text),
      );
    case "toolCall":
      return h(
        "div",
        { class: "part tool" },
        `→ ${p.value.toolName}(${compactJson(p.value.argsJson)})`,
      );
    case "toolResult":
      return h(
        "div",
        { class: "part tool" },
        p.value.denied
          ? `✗ ${p.value.toolName} denied ${p.value.resultJson}`
          : `← ${p.value.toolName} ${compactJson(p.value.resultJson)}`,
      );
    case "retry":
      return h("div", { class: "part failed" }, `retry ${p.value.toolName}: ${p.value.message}`);
    case "file":
      return h(
        "div",
        { class: "part" },
        `[file ${p.value.mediaType}, ${p.value.data.length} bytes]`,
      );
    case "other":
      return h("div", { class: "part" }, `[${p.value.partKind}] ${p.value.partJson}`);
    default:
      return h("div", { class: "part" }, "");
  }
}
