/**
 * Reading a plain TCP or Unix socket into one reused buffer, instead of a
 * fresh 64 KiB buffer per read.
 *
 * Why: every socket read normally allocates a new ArrayBuffer. Under 1 MiB
 * writes that is a gigabyte a second of short-lived external memory, and V8
 * answers external memory growth with full garbage collections: 25 a second,
 * a quarter of the daemon's CPU (docs/benchmarks.md). Node has the mechanism
 * (the `onread` option: the handle reads into a buffer we own and calls us
 * synchronously) but offers it only to sockets it connects, not to sockets a
 * server accepts. This module turns it on for an accepted socket, through
 * the same per-socket fields Node's own `onread` sets, found by their
 * descriptions on a probe socket; if this Node does not have them, nothing
 * changes and the socket goes on emitting 'data'.
 *
 * The callback's chunk is a view of the reused buffer: valid only until the
 * callback returns. The consumer copies what it keeps (transmission.ts:
 * `transient` chunks). Returning false from it stops reading (the socket is
 * paused; resume() reads again), as with Node's own onread.
 *
 * Never for TLS sockets: their records are read by the TLS layer.
 */
import net from 'node:net';

interface ReadFields {
  buffer: symbol;
  callback: symbol;
  generator: symbol;
}

let fields: ReadFields | null | undefined;

/** The per-socket fields of Node's onread mode, or null if this Node has no such fields. */
function readFields(): ReadFields | null {
  if (fields !== undefined) return fields;
  fields = null;
  try {
    // `onread` is in SocketConstructorOpts at run time, not in @types/node.
    const probe = new net.Socket({ onread: { buffer: Buffer.alloc(1), callback: () => true } } as net.SocketConstructorOpts);
    const bySymbol = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
    const buffer = bySymbol.get('kBuffer');
    const callback = bySymbol.get('kBufferCb');
    const generator = bySymbol.get('kBufferGen');
    probe.destroy();
    if (buffer && callback && generator) fields = { buffer, callback, generator };
  } catch {
    fields = null;
  }
  return fields;
}

type HandleWithUserBuffer = { useUserBuffer?: (buf: Uint8Array) => void };

/**
 * From now on, `socket` reads into `buffer` and calls `onChunk` with each
 * chunk (a view of `buffer`). Returns false, changing nothing, when the
 * socket cannot (TLS, no handle, a Node without the mechanism): the caller
 * keeps its 'data' listener, which also receives any bytes read before the
 * switch.
 */
export function readIntoBuffer(socket: net.Socket, buffer: Buffer, onChunk: (chunk: Buffer) => boolean): boolean {
  const f = readFields();
  const handle = (socket as unknown as { _handle?: HandleWithUserBuffer | null })._handle;
  if (f === null || !handle || typeof handle.useUserBuffer !== 'function' || 'encrypted' in socket) return false;
  const s = socket as unknown as Record<symbol, unknown>;
  s[f.buffer] = buffer;
  s[f.callback] = (nread: number, buf: Buffer) => onChunk(buf.subarray(0, nread));
  s[f.generator] = null;
  handle.useUserBuffer(buffer);
  return true;
}
