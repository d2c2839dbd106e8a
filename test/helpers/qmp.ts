/**
 * A minimal QMP client (the QEMU Machine Protocol) over a Unix socket, for
 * tests that drive a running QEMU: live migration, pausing, quitting.
 *
 *   const q = await QmpClient.connect('/tmp/x/src.qmp');   // greeting + qmp_capabilities
 *   await q.execute('migrate', { uri: 'tcp:127.0.0.1:4444' });
 *   const ev = await q.waitEvent('RESUME', 30_000);
 *   await q.execute('quit');                                 // resolves even if QEMU closes first
 *
 * The wire (qemu docs/interop/qmp-spec): one JSON object per line. The server
 * greets with {"QMP": …}; the client must send qmp_capabilities before any
 * other command. A command is {"execute", "arguments"?, "id"?}; its answer is
 * {"return": …, "id"} or {"error": {"class", "desc"}, "id"}; asynchronous
 * events {"event", "data"?, "timestamp": {seconds, microseconds}} may arrive
 * at any time, also between a command and its answer. We number commands
 * with `id` so answers are matched even when events interleave.
 */
import net from 'node:net';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** QEMU's own timestamp, in ms since the epoch. */
  qemuMs: number;
  /** Date.now() when it arrived. */
  at: number;
}

/** An error answer to a command: QMP's class and description. */
export class QmpError extends Error {
  constructor(readonly command: string, readonly errorClass: string, readonly desc: string) {
    super(`QMP ${command}: ${errorClass}: ${desc}`);
    this.name = 'QmpError';
  }
}

interface Pending { command: string; resolve(v: unknown): void; reject(e: Error): void }

export class QmpClient {
  /** Every event received so far, in arrival order. */
  readonly events: QmpEvent[] = [];
  private readonly pending = new Map<number, Pending>();
  private readonly waiters = new Set<(e: QmpEvent) => void>();
  private nextId = 1;
  private buf = '';
  private closedErr: Error | null = null;

  private constructor(private readonly socket: net.Socket, readonly path: string) {
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => this.onData(s));
    socket.on('error', () => { /* 'close' follows */ });
    socket.on('close', () => this.onClose());
  }

  /**
   * Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket, retrying
   * until it exists (QEMU creates it while starting), reads the greeting and
   * leaves capability negotiation.
   */
  static async connect(path: string, timeoutMs = 30_000): Promise<QmpClient> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(path);
          s.once('connect', () => { s.removeListener('error', reject); resolve(s); });
          s.once('error', reject);
        });
        const q = new QmpClient(socket, path);
        await q.greeting(Math.max(1000, deadline - Date.now()));
        await q.execute('qmp_capabilities');
        return q;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) {
          throw new Error(`QMP ${path}: cannot connect: ${(err as Error).message}`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Runs a command; resolves with its `return` value, rejects QmpError on an `error` answer. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closedErr) return Promise.reject(new Error(`QMP ${command}: ${this.closedErr.message}`));
    const id = this.nextId++;
    const msg = JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id });
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject });
      this.socket.write(msg + '\n');
    });
  }

  /**
   * The first event named `name` that arrived at or after `since` (Date.now()
   * ms; default: any, also one received before this call), or a rejection
   * after `timeoutMs` or when the connection closes.
   */
  waitEvent(name: string, timeoutMs: number, since = 0): Promise<QmpEvent> {
    const seen = this.events.find((e) => e.event === name && e.at >= since);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`QMP ${this.path}: no ${name} event within ${timeoutMs} ms`)), timeoutMs);
      const waiter = (e: QmpEvent) => {
        if (e.event === name && e.at >= since) done(null, e);
      };
      const done = (err: Error | null, e?: QmpEvent) => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
        this.waiters.delete(onClosed);
        if (err) reject(err); else resolve(e!);
      };
      // Called with a synthetic event when the connection closes.
      const onClosed = (e: QmpEvent) => {
        if (e.event === '') done(new Error(`QMP ${this.path}: connection closed while waiting for ${name}`));
      };
      this.waiters.add(waiter);
      this.waiters.add(onClosed);
    });
  }

  /** True once the socket closed (QEMU quit or died). */
  get closed(): boolean { return this.closedErr !== null; }

  close(): void { this.socket.destroy(); }

  // ------------------------------------------------------------ internals

  private greetingWaiter: ((m: Record<string, unknown>) => void) | null = null;

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { this.socket.destroy(); reject(new Error(`no QMP greeting within ${timeoutMs} ms`)); }, timeoutMs);
      this.greetingWaiter = () => { clearTimeout(timer); resolve(); };
      this.socket.once('close', () => { clearTimeout(timer); reject(new Error('closed before the QMP greeting')); });
    });
  }

  private onData(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(JSON.parse(line) as Record<string, unknown>);
    }
  }

  private onMessage(m: Record<string, unknown>): void {
    if ('QMP' in m) {
      this.greetingWaiter?.(m);
      this.greetingWaiter = null;
    } else if ('event' in m) {
      const ts = (m.timestamp ?? {}) as { seconds?: number; microseconds?: number };
      const e: QmpEvent = {
        event: String(m.event),
        data: (m.data ?? {}) as Record<string, unknown>,
        qemuMs: (ts.seconds ?? 0) * 1000 + (ts.microseconds ?? 0) / 1000,
        at: Date.now(),
      };
      this.events.push(e);
      for (const w of [...this.waiters]) w(e);
    } else if (typeof m.id === 'number') {
      const p = this.pending.get(m.id);
      if (!p) return;
      this.pending.delete(m.id);
      if ('error' in m) {
        const err = m.error as { class?: string; desc?: string };
        p.reject(new QmpError(p.command, err.class ?? 'GenericError', err.desc ?? ''));
      } else {
        p.resolve(m.return);
      }
    }
  }

  private onClose(): void {
    this.closedErr = new Error('QMP connection closed');
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      // `quit` is answered, or not, just before QEMU closes the socket: either way it worked.
      if (p.command === 'quit') p.resolve({});
      else p.reject(new Error(`QMP ${p.command}: connection closed before the answer`));
    }
    for (const w of [...this.waiters]) w({ event: '', data: {}, qemuMs: 0, at: Date.now() });
  }
}
