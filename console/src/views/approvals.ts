/**
 * #/approvals: the runs waiting for a human (state SUSPENDED) and the calls each
 * one waits for (GetRun's pending interrupts), with Approve and Deny (or, for a
 * deferred call, its result), sent with Resume through the client's decision
 * helpers. Read again every few seconds; a card stays put across refreshes so a
 * message being typed survives them.
 */
import { InterruptKind, RunState, type Interrupt, type Run } from "@keel/client/web";
import type { ViewContext } from "../context.js";
import { h, replace } from "../dom.js";
import { formatTime, prettyJson } from "../format.js";
import { runLink } from "./common.js";

const REFRESH_MS = 2000;
const MAX_RUNS = 100;

export function approvalsView(ctx: ViewContext): void {
  const list = h("div", { id: "approvals-list", "data-testid": "approvals-list" });
  const empty = h(
    "p",
    { class: "muted", "data-testid": "approvals-empty", hidden: true },
    "No run waits for a decision.",
  );
  const updated = h("span", { class: "muted", "data-testid": "approvals-updated" }, "loading…");
  replace(
    ctx.root,
    h("h1", null, "Approvals"),
    h(
      "div",
      { class: "toolbar" },
      updated,
      h(
        "button",
        { type: "button", id: "approvals-refresh", onclick: () => void refresh() },
        "Refresh",
      ),
    ),
    empty,
    list,
  );

  const cards = new Map<string, HTMLElement>();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let running = false;
  let refreshFailed = false;
  ctx.signal.addEventListener("abort", () => clearTimeout(timer));

  async function refresh(): Promise<void> {
    if (running || ctx.signal.aborted) {
      return;
    }
    running = true;
    clearTimeout(timer);
    try {
      const { runs } = await ctx.client.listRuns(
        { states: [RunState.SUSPENDED], pageSize: MAX_RUNS },
        { signal: ctx.signal },
      );
      // ListRuns leaves pending_interrupts empty: GetRun has them.
      const full = await Promise.all(
        runs.map((run) =>
          ctx.client
            .getRun(run.runId, { signal: ctx.signal })
            .catch((): Run | undefined => undefined),
        ),
      );
      const wanted = new Set<string>();
      for (const run of full) {
        if (run === undefined || run.state !== RunState.SUSPENDED) {
          continue;
        }
        for (const interrupt of run.pendingInterrupts) {
          const key = `${run.runId}/${interrupt.toolCallId}`;
          wanted.add(key);
          if (!cards.has(key)) {
            const card = approvalCard(ctx, run, interrupt, () => {
              cards.delete(key);
              void refresh();
            });
            cards.set(key, card);
            list.append(card);
          }
        }
      }
      for (const [key, card] of cards) {
        if (!wanted.has(key)) {
          card.remove();
          cards.delete(key);
        }
      }
      if (refreshFailed) {
        refreshFailed = false;
        ctx.clearError(); // the server answers again
      }
      empty.hidden = cards.size > 0;
      updated.textContent = `${cards.size} pending · updated ${new Date().toLocaleTimeString()}`;
    } catch (error) {
      refreshFailed = true;
      ctx.fail(error);
    } finally {
      running = false;
      if (!ctx.signal.aborted) {
        timer = setTimeout(() => void refresh(), REFRESH_MS);
      }
    }
  }
  void refresh();
}

function approvalCard(
  ctx: ViewContext,
  run: Run,
  interrupt: Interrupt,
  done: () => void,
): HTMLElement {
  const status = h("span", { class: "muted", "data-testid": "approval-status" });
  const buttons: HTMLButtonElement[] = [];
  const card = h("div", {
    class: "card approval",
    "data-testid": "approval",
    "data-run-id": run.runId,
    "data-tool-call-id": interrupt.toolCallId,
  });
  const decide = (what: string, send: () => Promise<unknown>): void => {
    buttons.forEach((button) => (button.disabled = true));
    status.textContent = `${what}…`;
    send()
      .then(() => {
        status.textContent = `${what}: sent`;
        card.classList.add("decided");
        setTimeout(() => {
          card.remove();
          done();
        }, 600);
      })
      .catch((error: unknown) => {
        buttons.forEach((button) => (button.disabled = false));
        status.textContent = "";
        ctx.fail(error);
      });
  };

  let controls: HTMLElement;
  if (interrupt.kind === InterruptKind.CALL) {
    const answer = h("input", { placeholder: "result (JSON)", "data-testid": "answer-json" });
    buttons.push(
      h(
        "button",
        {
          type: "button",
          "data-testid": "answer",
          onclick: () =>
            decide("result", () => {
              const result: unknown = JSON.parse(answer.value === "" ? "null" : answer.value);
              return ctx.client.answer(run.runId, interrupt.toolCallId, result as never, {
                signal: ctx.signal,
              });
            }),
        },
        "Send result",
      ),
    );
    controls = h("div", { class: "toolbar" }, answer, ...buttons, status);
  } else {
    const message = h("input", {
      placeholder: "why (the model sees it)",
      class: "wide",
      "data-testid": "deny-message",
    });
    buttons.push(
      h(
        "button",
        {
          type: "button",
          class: "approve",
          "data-testid": "approve",
          onclick: () =>
            decide("approved", () =>
              ctx.client.approve(run.runId, interrupt.toolCallId, { signal: ctx.signal }),
            ),
        },
        "Approve",
      ),
      h(
        "button",
        {
          type: "button",
          class: "deny",
          "data-testid": "deny",
          onclick: () =>
            decide("denied", () =>
              ctx.client.deny(run.runId, interrupt.toolCallId, {
                message: message.value,
                signal: ctx.signal,
              }),
            ),
        },
        "Deny",
      ),
    );
    controls = h("div", { class: "toolbar" }, ...buttons, message, status);
  }

  replace(
    card,
    h(
      "div",
      { class: "card-head" },
      h("b", { "data-testid": "approval-tool" }, interrupt.toolName),
      " · run ",
      runLink(run.runId),
      ` · ${run.agentId} · call ${interrupt.toolCallId} · suspended ${formatTime(run.updateTime)}`,
    ),
    h("pre", { class: "args", "data-testid": "approval-args" }, prettyJson(interrupt.argsJson)),
    controls,
  );
  return card;
}
