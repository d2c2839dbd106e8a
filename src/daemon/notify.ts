/**
 * systemd's readiness protocol (sd_notify(3)): with Type=notify, systemd
 * starts the units ordered after ours only once we say READY=1, and shows
 * STATUS= in `systemctl status`. The daemon sends READY=1 once every
 * listener is up, and STOPPING=1 when shutdown begins.
 *
 * The protocol is one AF_UNIX datagram to $NOTIFY_SOCKET. Node cannot open
 * AF_UNIX datagram sockets (node:dgram is UDP only, node:net stream only),
 * so each message is sent by systemd's own `systemd-notify` (package
 * systemd), run without a shell. That needs NotifyAccess=all in the unit:
 * the datagram comes from the helper's PID (a non-root daemon cannot lend it
 * ours), which systemd accepts from any process of the service's cgroup. The
 * helper stays alive until systemd has processed the message (it waits on a
 * BARRIER=1, systemd ≥ 246), so systemd can still attribute it to our
 * cgroup — a helper that exited first would be ignored.
 *
 * $NOTIFY_SOCKET is removed from our environment at start (as sd_notify's
 * unset_environment does), so the children we run (`--run CMD`) cannot send
 * notifications as us. Without $NOTIFY_SOCKET nothing is sent.
 */
import { execFile } from 'node:child_process';
import type { Logger } from '../common/log.js';

export interface Notifier {
  /** READY=1: the listeners are up. */
  ready(status: string): Promise<void>;
  /** STOPPING=1: shutdown has begun. */
  stopping(status: string): Promise<void>;
}

/** How long one systemd-notify may take (it waits for systemd to process the message). */
const NOTIFY_TIMEOUT_MS = 10_000;

/** Does nothing: not started by systemd (or Type≠notify). */
const NONE: Notifier = { ready: async () => {}, stopping: async () => {} };

/**
 * A Notifier for $NOTIFY_SOCKET, which it removes from `env`; the no-op one
 * when it is unset. Failures are logged, never thrown: a daemon that serves
 * is better than one that exits because systemd could not be told.
 */
export function systemdNotifier(log: Logger, env: NodeJS.ProcessEnv = process.env, command = 'systemd-notify'): Notifier {
  const socket = env.NOTIFY_SOCKET;
  delete env.NOTIFY_SOCKET;
  if (!socket) return NONE;
  const send = (vars: string[]) =>
    new Promise<void>((resolve) => {
      execFile(command, vars, { env: { ...env, NOTIFY_SOCKET: socket }, timeout: NOTIFY_TIMEOUT_MS }, (err, _out, stderr) => {
        if (err) {
          const why = (err as NodeJS.ErrnoException).code === 'ENOENT' ? `${command} not found (install systemd)` : stderr.trim() || err.message;
          log.error(`systemd notify ${vars[0]}: ${why}`, { socket });
        } else {
          log.debug(`systemd notify ${vars.join(' ')}`, { socket });
        }
        resolve();
      });
    });
  return {
    ready: (status) => send(['READY=1', `STATUS=${status}`]),
    stopping: (status) => send(['STOPPING=1', `STATUS=${status}`]),
  };
}
