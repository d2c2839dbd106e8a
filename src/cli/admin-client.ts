/**
 * Commands that ask the local daemon (snapshot, faults, lock/unlock,
 * open/close) send one request to its admin socket (src/daemon/admin.ts).
 */
import { adminRequest } from '../daemon/admin.js';

/**
 * Sends `request` to the admin socket at `socket` and returns the reply; a
 * daemon that is not there, or a refusal, is one clear error (`hint` is
 * added to the first kind).
 */
export async function askDaemon(socket: string, request: Record<string, unknown>, hint = 'is the daemon running?'): Promise<Record<string, unknown>> {
  let reply;
  try {
    reply = await adminRequest(socket, request);
  } catch (err) {
    throw Object.assign(new Error(`admin socket ${socket}: ${(err as Error).message} (${hint})`), { code: 'ARCH_E_ADMIN' });
  }
  if (!reply.ok) throw Object.assign(new Error(reply.message), { code: reply.code });
  return reply;
}
