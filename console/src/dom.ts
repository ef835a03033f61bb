/** A few DOM helpers: the console has no UI framework. */

export type Child = Node | string | number | bigint | null | undefined | false | Child[];
type AttrValue = string | number | bigint | boolean | null | undefined;
export type Attrs = { [name: string]: AttrValue | ((event: Event) => void) };

/**
 * An element: `h("a", { href: "#/runs", "data-testid": "x", onclick: f }, "text", child)`.
 * Attributes that are false, null or undefined are left out; true is an empty attribute;
 * `on<event>` functions are listeners.
 */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs | null = null,
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (typeof value === "function") {
      element.addEventListener(name.slice(2), value);
    } else if (value === true) {
      element.setAttribute(name, "");
    } else if (value !== false && value !== null && value !== undefined) {
      element.setAttribute(name, String(value));
    }
  }
  append(element, ...children);
  return element;
}

/** Appends children, flattening arrays and skipping empty values. */
export function append(parent: Node, ...children: Child[]): void {
  for (const child of children) {
    if (Array.isArray(child)) {
      append(parent, ...child);
    } else if (child instanceof Node) {
      parent.appendChild(child);
    } else if (child !== null && child !== undefined && child !== false) {
      parent.appendChild(document.createTextNode(String(child)));
    }
  }
}

/** Replaces an element's children. */
export function replace(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, ...children);
}

/** A table with a header row; `rows` are <tr> elements. */
export function table(testid: string, headers: string[], rows: HTMLTableRowElement[]): HTMLElement {
  return h(
    "table",
    { "data-testid": testid },
    h(
      "thead",
      null,
      h(
        "tr",
        null,
        headers.map((name) => h("th", null, name)),
      ),
    ),
    h("tbody", null, rows),
  );
}

/** A <td>. */
export function td(...children: Child[]): HTMLTableCellElement {
  return h("td", null, ...children);
}

/** Text cut to `max` characters, with the whole of it in the title. */
export function truncated(text: string, max = 120): HTMLElement {
  if (text.length <= max) {
    return h("span", null, text);
  }
  return h("span", { title: text }, text.slice(0, max - 1) + "…");
}

/** A <select> of options (value, label); `value` is selected. */
export function select(
  attrs: Attrs,
  options: Array<[string, string]>,
  value: string,
): HTMLSelectElement {
  const element = h(
    "select",
    attrs,
    options.map(([optionValue, label]) => h("option", { value: optionValue }, label)),
  );
  element.value = value;
  return element;
}
