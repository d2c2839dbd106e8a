/**
 * A small structured logger: one JSON object per line on stderr (journald
 * keeps it as the message), with a level, a message in "what: why" form and
 * fields. Shared by every layer, so it imports nothing of the project.
 *
 * Hot paths log nothing at info; per-request detail goes to `debug`, which is
 * off unless asked for, and callers guard expensive fields with `enabled()`.
 */

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
}

export function createLogger(options: LoggerOptions = {}, bindings: LogFields = {}): Logger {
  const min = ORDER[options.level ?? 'info'];
  const write = options.write ?? ((line: string) => process.stderr.write(line));
  const emit = (level: LogLevel, msg: string, fields?: LogFields) => {
    if (ORDER[level] < min) return;
    const rec: LogFields = { time: new Date().toISOString(), level, msg, ...bindings, ...fields };
    write(JSON.stringify(rec, errorReplacer) + '\n');
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
  if (value instanceof Error) {
    const e = value as Error & { code?: unknown };
    return { name: e.name, message: e.message, code: e.code };
  }
  if (typeof value === 'bigint') return value.toString();
  return value;
}
