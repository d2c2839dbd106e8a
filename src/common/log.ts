/**
 * A small structured logger: one JSON object per line on stderr, with a
 * level, a message in "what: why" form and fields. Shared by every layer, so
 * it imports nothing of the project.
 *
 *   {"time":"…","level":"warn","msg":"handshake failed: …","component":"nbd","peer":"127.0.0.1:40512"}
 *
 * Always JSON, on a terminal too: one format for people (`jq`) and for log
 * shippers, and no guessing from isatty. Under systemd (stderr is the
 * journal's stream: $JOURNAL_STREAM) each line starts with its syslog
 * priority, `<4>{…}`, which journald strips and stores as PRIORITY, so
 * `journalctl -p warning -u archipelago` works; the JSON is the MESSAGE.
 *
 * Errors in fields are written as {name, message, code} plus the `op` and
 * `object` a backend error names, and its `cause` chain, so a failed request
 * logs the object and errno the store gave.
 *
 * Hot paths log nothing at info; per-request detail goes to `debug`, which is
 * off unless asked for, and callers guard expensive fields with `enabled()`.
 */
import fs from 'node:fs';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error' | 'silent';
const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  enabled(level: LogLevel): boolean;
  /** A logger that adds `bindings` to every line. */
  child(bindings: LogFields): Logger;
}

export interface LoggerOptions {
  level?: LogLevel;
  /** Where lines go; default process.stderr. */
  write?: (line: string) => void;
  /** Start each line with its syslog priority, "<3>" … "<7>" (journald; see stderrIsJournal). */
  syslogPriority?: boolean;
}

/** sd-daemon(3) priorities, for journald's SyslogLevelPrefix. */
const PRIORITY: Record<LogLevel, string> = { debug: '<7>', info: '<6>', warn: '<4>', error: '<3>', silent: '' };

/**
 * True when stderr is connected to the journal: systemd sets
 * $JOURNAL_STREAM to "DEVICE:INODE" of the stream it gave us
 * (systemd.exec(5)); it is inherited, so it is compared with fd 2.
 */
export function stderrIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fs.fstatSync(2, { bigint: true });
    return st.dev === BigInt(m[1]!) && st.ino === BigInt(m[2]!);
  } catch {
    return false;
  }
}

export function createLogger(options: LoggerOptions = {}, bindings: LogFields = {}): Logger {
  const min = ORDER[options.level ?? 'info'];
  const write = options.write ?? ((line: string) => process.stderr.write(line));
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (ORDER[level] < min) return;
    const rec: LogFields = { time: new Date().toISOString(), level, msg, ...bindings, ...fields };
    write((options.syslogPriority ? PRIORITY[level] : '') + JSON.stringify(rec, errorReplacer) + '\n');
  };
  return {
    debug: (m, f) => emit('debug', m, f),
    info: (m, f) => emit('info', m, f),
    warn: (m, f) => emit('warn', m, f),
    error: (m, f) => emit('error', m, f),
    enabled: (level) => ORDER[level] >= min,
    child: (b) => createLogger(options, { ...bindings, ...b }),
  };
}

/** Discards everything (tests, embedded use). */
export const silentLogger: Logger = createLogger({ level: 'silent' });

function errorReplacer(_key: string, value: unknown): unknown {
  if (value instanceof Error) return errorFields(value, 0);
  if (typeof value === 'bigint') return value.toString();
  return value;
}

/** An Error as plain fields: code, and the op/object of a backend error, down its cause chain (4 deep). */
function errorFields(e: Error & { code?: unknown; op?: unknown; object?: unknown }, depth: number): LogFields {
  const out: LogFields = { name: e.name, message: e.message, code: e.code };
  if (typeof e.op === 'string') out.op = e.op;
  if (typeof e.object === 'string') out.object = e.object;
  if (e.cause instanceof Error && depth < 4) out.cause = errorFields(e.cause, depth + 1);
  return out;
}
