/**
 * TLS as the NBD layer sees it (doc/proto.md, "TLS support"): a mode, a way
 * to upgrade a socket after NBD_OPT_STARTTLS was acknowledged, and an
 * access check by client identity. No node:tls here: the daemon injects the
 * upgrade (src/daemon/tls.ts loads certificates and keys and runs the TLS
 * handshake), so this layer stays free of credentials and files, and unit
 * tests can inject their own.
 *
 * Modes, in the spec's words:
 * - no NbdTls at all: NOTLS; STARTTLS gets NBD_REP_ERR_POLICY;
 * - 'optional': SELECTIVETLS; a plaintext client may use the exports its
 *   identity (none) is allowed, and every other export is "TLS-only"
 *   (INFO/GO get NBD_REP_ERR_TLS_REQD before TLS, LIST omits it);
 * - 'required': FORCEDTLS; every option but STARTTLS and ABORT gets
 *   NBD_REP_ERR_TLS_REQD until TLS is up, EXPORT_NAME ends the connection.
 */
import type { Socket } from 'node:net';
import { NbdProtocolError } from './errors.js';

/** Who the client proved to be in the TLS handshake. */
export interface TlsPeer {
  /**
   * How: a pre-shared key (`name` is its identity), a client certificate
   * that verified against the CA (`name` is its subject CN, `dn` the whole
   * subject), or no client authentication (TLS with a server certificate only).
   */
  method: 'psk' | 'x509' | 'none';
  /** PSK identity or certificate CN; '' for method 'none' (or a certificate without CN). */
  name: string;
  /** X.509 only: the subject DN, most specific first as RFC 4514 writes it ("CN=host1,O=Example,C=GB"). */
  dn?: string;
  /** For logs: protocol and cipher ("TLSv1.3 TLS_AES_256_GCM_SHA384"). */
  session?: string;
}

export type TlsMode = 'optional' | 'required';

/** The TLS session that replaced a plaintext socket. */
export interface TlsUpgrade {
  /** Carries the rest of the handshake and the transmission phase. */
  socket: Socket;
  peer: TlsPeer;
}

export interface NbdTls {
  mode: TlsMode;
  /**
   * Runs the server side of the TLS handshake on `socket`, whose next byte
   * from the client is the first of the handshake. Resolves once the client
   * is authenticated as configured; rejects (and destroys the socket) when
   * the handshake fails or the peer's credentials are refused.
   */
  upgrade(socket: Socket): Promise<TlsUpgrade>;
  /**
   * May this client open export `name`? `peer` is null for a plaintext
   * client (mode 'optional' only). Absent: every client may open every
   * export. Called for LIST, INFO, GO, EXPORT_NAME and the meta context
   * options, before any export is opened; must be cheap and must not throw.
   */
  authorize?(peer: TlsPeer | null, name: string): boolean;
}

/** The TLS handshake after NBD_OPT_STARTTLS failed: the connection must end (there is no going back to plaintext). */
export class NbdTlsError extends NbdProtocolError {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message);
    this.name = 'NbdTlsError';
    if (options?.cause !== undefined) (this as { cause?: unknown }).cause = options.cause;
  }
}

/** "psk:alice", "x509:CN=host1,O=Example", "tls (no client certificate)", or "plaintext", for logs. */
export function describePeer(peer: TlsPeer | null): string {
  if (peer === null) return 'plaintext';
  switch (peer.method) {
    case 'psk': return `psk:${peer.name}`;
    case 'x509': return `x509:${peer.dn ?? `CN=${peer.name}`}`;
    case 'none': return 'tls (no client certificate)';
  }
}
