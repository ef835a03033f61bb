/** How the console writes times, states and JSON. */

/** A protobuf Timestamp (seconds as bigint, nanos) or undefined. */
export interface TimestampLike {
  seconds: bigint;
  nanos: number;
}

export function timeMs(ts: TimestampLike | undefined): number | undefined {
  return ts === undefined ? undefined : Number(ts.seconds) * 1000 + Math.floor(ts.nanos / 1e6);
}

/** "2025-01-02 03:04:05" in local time, "" for no time. */
export function formatTime(ts: TimestampLike | undefined): string {
  const ms = timeMs(ts);
  if (ms === undefined || ms === 0) {
    return "";
  }
  const d = new Date(ms);
  const pad = (n: number): string => String(n).padStart(2, "0");
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`
  );
}

/** A protobuf Duration as "90s", "2h", "365d". */
export function formatDuration(duration: TimestampLike | undefined): string {
  if (duration === undefined) {
    return "";
  }
  const s = Number(duration.seconds) + duration.nanos / 1e9;
  for (const [unit, size] of [
    ["d", 86400],
    ["h", 3600],
    ["m", 60],
  ] as const) {
    if (s >= size && s % size === 0) {
      return `${s / size}${unit}`;
    }
  }
  return `${s}s`;
}

/**
 * An enum value's name without its prefix: enumName(RunState, 3, "RUN_STATE_") is
 * "SUSPENDED". protobuf-es enums map numbers to names without the prefix already.
 */
export function enumName(values: object, value: number): string {
  const name = (values as { [key: number]: string | undefined })[value];
  return name ?? String(value);
}

/** JSON text, compact; unparsable text as it is. */
export function compactJson(text: string): string {
  if (text === "") {
    return "";
  }
  try {
    return JSON.stringify(JSON.parse(text));
  } catch {
    return text;
  }
}

/** JSON text, indented for a <pre>. */
export function prettyJson(text: string): string {
  if (text === "") {
    return "";
  }
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/** A short form of a long id for narrow columns. */
export function shortId(id: string): string {
  return id.length > 14 ? `${id.slice(0, 12)}…` : id;
}
