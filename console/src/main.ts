/**
 * Keel's operator console: hash routes, one view at a time.
 *
 *   #/runs                 runs, filtered by agent, state and thread, paged; start a run
 *   #/runs/<run id>        a run live: text, reasoning, tool calls, tasks, approvals, events
 *   #/approvals            suspended runs and their pending interrupts: approve, deny
 *   #/threads[/<id>]       threads, and a thread's messages
 *   #/tasks                background tasks
 *   #/schedules[/<id>]     schedules, and a schedule's firings
 */
import "./style.css";
import { Api, describeError, isCancelled, isUnauthenticated } from "./api.js";
import { href, type View, type ViewContext } from "./context.js";
import { h } from "./dom.js";
import { approvalsView } from "./views/approvals.js";
import { runView } from "./views/run.js";
import { runsView } from "./views/runs.js";
import { scheduleView, schedulesView } from "./views/schedules.js";
import { tasksView } from "./views/tasks.js";
import { threadView, threadsView } from "./views/threads.js";

const api = new Api(window.location.origin);

function pick(name: string, path: string[]): View {
  switch (name) {
    case "runs":
      return path.length > 0 ? runView : runsView;
    case "approvals":
      return approvalsView;
    case "threads":
      return path.length > 0 ? threadView : threadsView;
    case "tasks":
      return tasksView;
    case "schedules":
      return path.length > 0 ? scheduleView : schedulesView;
    default:
      return runsView;
  }
}

function parseHash(): { name: string; path: string[]; query: URLSearchParams } {
  const hash = window.location.hash.replace(/^#\/?/, "");
  const [route = "", search = ""] = hash.split("?", 2);
  const [name = "", ...path] = route.split("/").filter((part) => part !== "");
  return {
    name: name === "" ? "runs" : name,
    path: path.map(decodeURIComponent),
    query: new URLSearchParams(search),
  };
}

let leaving: AbortController | undefined;

function render(): void {
  leaving?.abort();
  const controller = new AbortController();
  leaving = controller;
  const { name, path, query } = parseHash();
  for (const link of document.querySelectorAll<HTMLAnchorElement>("#nav a")) {
    link.classList.toggle("active", link.dataset.route === name);
  }
  // Without a key the views cannot load: the dialog stays until one is given.
  document.getElementById("api-key-dialog")!.addEventListener("cancel", (event) => {
    event.preventDefault();
  });

  document.getElementById("forget-key")!.hidden = api.apiKey === undefined;

  const errorBox = h("p", {
    class: "error",
    id: "view-error",
    "data-testid": "error",
    hidden: true,
  });
  const content = h("div", { id: "view-content" });
  document.getElementById("view")!.replaceChildren(errorBox, content);
  const ctx: ViewContext = {
    root: content,
    path,
    query,
    get client() {
      return api.client;
    },
    signal: controller.signal,
    fail(error: unknown) {
      if (controller.signal.aborted || isCancelled(error)) {
        return;
      }
      if (isUnauthenticated(error)) {
        askForKey();
        return;
      }
      console.error(error);
      errorBox.textContent = describeError(error);
      errorBox.hidden = false;
    },
    clearError() {
      errorBox.hidden = true;
    },
    navigate(target, targetPath = [], targetQuery = {}) {
      window.location.hash = href(target, targetPath, targetQuery);
    },
  };
  try {
    pick(name, path)(ctx);
  } catch (error) {
    ctx.fail(error);
  }
}

function askForKey(): void {
  const dialog = document.getElementById("api-key-dialog") as HTMLDialogElement;
  if (dialog.open) {
    return;
  }
  const error = document.getElementById("api-key-error")!;
  error.hidden = api.apiKey === undefined;
  error.textContent = "The server did not accept this key.";
  // The view behind the dialog waits for a key: stop its calls and streams.
  leaving?.abort();
  dialog.showModal();
  (document.getElementById("api-key-input") as HTMLInputElement).focus();
}

document.getElementById("api-key-form")!.addEventListener("submit", () => {
  const input = document.getElementById("api-key-input") as HTMLInputElement;
  api.setApiKey(input.value.trim());
  input.value = "";
  render();
});

document.getElementById("forget-key")!.addEventListener("click", () => {
  api.setApiKey(undefined);
  render();
});

window.addEventListener("hashchange", render);
render();
