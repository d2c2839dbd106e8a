/**
 * TLS for the NBD server: load the credentials named by the `tls-*`
 * settings once at start-up (clear errors for missing, unreadable or
 * mismatched files), and upgrade a client's socket after NBD_OPT_STARTTLS
 * (src/nbd/tls.ts defines what the NBD layer expects). docs/tls.md is the
 * operator's guide.
 *
 * Credentials, one kind per daemon (a TLS session authenticates one way, and
 * mixing them would let a certificate session be mistaken for a PSK one):
 *
 * - X.509, a directory laid out as QEMU's tls-creds-x509 (endpoint=server)
 *   and nbdkit's --tls-certificates: server-cert.pem (may hold the chain),
 *   server-key.pem, ca-cert.pem (the CA that signs client certificates;
 *   required when tls-verify-peer is on), ca-crl.pem (optional revocation
 *   list). With tls-verify-peer (the default, as in QEMU) a client must
 *   present a certificate that verifies against ca-cert.pem; its subject is
 *   its identity.
 * - PSK, a keys file as psktool(1) writes it and QEMU's tls-creds-psk and
 *   nbdkit's --tls-psk read: one `identity:hexkey` line per client. The
 *   server has no certificate, so a session can only be PSK-authenticated.
 *   TLS 1.3 PSK (with ECDHE) works with OpenSSL's PSK callback as long as a
 *   SHA-256 cipher suite is enabled (Node's defaults are); TLS 1.2 uses the
 *   ECDHE-PSK and PSK suites enabled below.
 *
 * The upgrade runs Node's own server-side TLS: a tls.Server that never
 * listens is handed the plaintext socket ('connection'), so client
 * certificate checks (requestCert/rejectUnauthorized, CRL) and the TLS
 * handshake timeout are Node's. One tls.Server per upgrade (its secure
 * context is built from the buffers loaded at start-up, about 1.5 ms) keeps
 * each handshake's events and PSK identity apart without Node internals.
 */
import fs from 'node:fs/promises';
import path from 'node:path';
import tls from 'node:tls';
import type { Socket } from 'node:net';
import { NbdTlsError, type NbdTls, type TlsPeer, type TlsUpgrade } from '../nbd/tls.js';
import { describeFsError, loadAllowList, type AllowList } from './tls-allow.js';
import type { Logger } from '../common/log.js';

/** The `tls-*` settings (config.ts), as the daemon receives them. */
export interface TlsSettings {
  /** off: NOTLS; on: clients may upgrade (SELECTIVETLS); require: they must (FORCEDTLS). */
  mode: 'off' | 'on' | 'require';
  /** Directory with server-cert.pem, server-key.pem, ca-cert.pem, ca-crl.pem; null: none. */
  certificatesDir: string | null;
  /** X.509: clients must present a certificate signed by ca-cert.pem. */
  verifyPeer: boolean;
  /** psktool keys file; null: none. */
  pskFile: string | null;
  /** Allow-list file (tls-allow.ts); null: every client may open every export. */
  allowFile: string | null;
}

export const TLS_MODES = ['off', 'on', 'require'] as const;

/** A TLS setting that cannot work: exit status 2 like every configuration error. */
export class TlsConfigError extends Error {
  readonly code = 'ARCH_E_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'TlsConfigError';
  }
}

/** The TLS handshake must finish within this time (our handshake deadline also covers it). */
const TLS_HANDSHAKE_TIMEOUT_MS = 10_000;

/** TLS 1.2 suites for PSK (TLS 1.3 suites are not set by this string); forward-secret first. */
const PSK_CIPHERS = 'ECDHE-PSK-AES256-GCM-SHA384:ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:PSK-CHACHA20-POLY1305:PSK-AES128-GCM-SHA256';

/** Credentials loaded at start-up. */
export type TlsCredentials =
  | { kind: 'x509'; dir: string; cert: Buffer; key: Buffer; ca?: Buffer; crl?: Buffer; verifyPeer: boolean }
  | { kind: 'psk'; file: string; keys: Map<string, Buffer> };

/** What startDaemon gets: the NbdServer's TLS option and a line for the start-up log. */
export interface LoadedTls {
  nbd: NbdTls;
  credentials: TlsCredentials;
  allowList: AllowList | null;
  /** "require, X.509 from /etc/…/tls (client certificates verified), allow-list /etc/…/allow (3 rules)". */
  summary: string;
}

/**
 * Checks the TLS settings and loads every file they name. Null when TLS is
 * off (the credential settings are then ignored; an allow-list is refused,
 * as it would silently restrict nothing). Throws TlsConfigError.
 */
export async function loadTls(s: TlsSettings, log: Logger): Promise<LoadedTls | null> {
  if (s.mode === 'off') {
    if (s.allowFile) throw new TlsConfigError(`tls-allow ${s.allowFile} is set but tls = off: the allow-list needs tls = on or require`);
    return null;
  }
  if (s.certificatesDir && s.pskFile) {
    throw new TlsConfigError('tls-certificates and tls-psk-file are both set: choose one (a TLS session authenticates with certificates or with a pre-shared key)');
  }
  if (!s.certificatesDir && !s.pskFile) throw new TlsConfigError(`tls = ${s.mode} needs credentials: set tls-certificates or tls-psk-file`);
  const credentials = s.certificatesDir ? await loadX509(s.certificatesDir, s.verifyPeer, log) : await loadPsk(s.pskFile!, log);
  const allowList = s.allowFile ? await loadAllowList(s.allowFile) : null;
  const nbd: NbdTls = {
    mode: s.mode === 'require' ? 'required' : 'optional',
    upgrade: tlsUpgrader(credentials),
    ...(allowList ? { authorize: allowList.allows } : {}),
  };
  const creds = credentials.kind === 'x509'
    ? `X.509 from ${credentials.dir} (${credentials.verifyPeer ? 'client certificates verified' : 'no client certificates'})`
    : `PSK from ${credentials.file} (${credentials.keys.size} ${credentials.keys.size === 1 ? 'identity' : 'identities'})`;
  const allow = allowList ? `allow-list ${allowList.path} (${allowList.rules.length} rules)` : 'no allow-list';
  return { nbd, credentials, allowList, summary: `${s.mode}, ${creds}, ${allow}` };
}

/** Reads a credential file; missing or unreadable is a TlsConfigError naming the setting. */
async function readCredential(setting: string, file: string, log: Logger, secret: boolean): Promise<Buffer> {
  try {
    if (secret) {
      const st = await fs.stat(file);
      // Warn only: the operator may have reasons (a container's one user).
      if (st.mode & 0o004) log.warn(`${setting}: ${file} is readable by every user: chmod o-r it (it holds a secret key)`);
    }
    return await fs.readFile(file);
  } catch (err) {
    throw new TlsConfigError(`${setting}: ${file}: ${describeFsError(err)}`);
  }
}

async function optionalCredential(setting: string, file: string, log: Logger): Promise<Buffer | undefined> {
  try {
    await fs.access(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
  }
  return readCredential(setting, file, log, false);
}

/** Loads and checks an X.509 directory (the file names of QEMU's tls-creds-x509). */
export async function loadX509(dir: string, verifyPeer: boolean, log: Logger): Promise<TlsCredentials> {
  const setting = `tls-certificates ${dir}`;
  try {
    if (!(await fs.stat(dir)).isDirectory()) throw new TlsConfigError(`${setting}: not a directory`);
  } catch (err) {
    if (err instanceof TlsConfigError) throw err;
    throw new TlsConfigError(`${setting}: ${describeFsError(err)}`);
  }
  const cert = await readCredential(setting, path.join(dir, 'server-cert.pem'), log, false);
  const key = await readCredential(setting, path.join(dir, 'server-key.pem'), log, true);
  const ca = verifyPeer
    ? await readCredential(`${setting} (tls-verify-peer needs the CA of client certificates)`, path.join(dir, 'ca-cert.pem'), log, false)
    : await optionalCredential(setting, path.join(dir, 'ca-cert.pem'), log);
  const crl = await optionalCredential(setting, path.join(dir, 'ca-crl.pem'), log);
  const creds: TlsCredentials = { kind: 'x509', dir, cert, key, ca, crl, verifyPeer };
  try {
    // Parses everything and checks that the key matches the certificate.
    tls.createSecureContext(contextOptions(creds));
  } catch (err) {
    throw new TlsConfigError(`${setting}: ${openSslReason(err)} (server-cert.pem, server-key.pem, ca-cert.pem, ca-crl.pem)`);
  }
  return creds;
}

/**
 * Parses a psktool keys file: `identity:hexkey` a line (split at the first
 * ":"), blank lines skipped. Throws TlsConfigError "FILE:LINE: what".
 */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    if (line.trim() === '') continue;
    const bad = (why: string) => new TlsConfigError(`tls-psk-file ${file}:${i + 1}: ${why}`);
    const colon = line.indexOf(':');
    if (colon <= 0) throw bad('expected IDENTITY:HEXKEY (as psktool writes it)');
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1).trim();
    // OpenSSL's limits: identity ≤ 128 bytes on the wire (PSK_MAX_IDENTITY_LEN 256, Node 128), key ≤ 512 bytes.
    if (Buffer.byteLength(identity) > 128) throw bad('identity longer than 128 bytes');
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) throw bad(`key of ${JSON.stringify(identity)} is not an even number of hex digits`);
    if (hex.length > 1024) throw bad(`key of ${JSON.stringify(identity)} is longer than 512 bytes`);
    if (keys.has(identity)) throw bad(`identity ${JSON.stringify(identity)} appears twice`);
    keys.set(identity, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new TlsConfigError(`tls-psk-file ${file}: no keys (create them with: psktool -u IDENTITY -p ${file})`);
  return keys;
}

export async function loadPsk(file: string, log: Logger): Promise<TlsCredentials> {
  const text = (await readCredential('tls-psk-file', file, log, true)).toString('utf8');
  return { kind: 'psk', file, keys: parsePskFile(text, file) };
}

/** Options of tls.createServer for these credentials. */
function contextOptions(c: TlsCredentials): tls.TlsOptions {
  const common: tls.TlsOptions = { minVersion: 'TLSv1.2', handshakeTimeout: TLS_HANDSHAKE_TIMEOUT_MS };
  if (c.kind === 'psk') return { ...common, ciphers: PSK_CIPHERS };
  return {
    ...common,
    cert: c.cert,
    key: c.key,
    ...(c.ca ? { ca: c.ca } : {}),
    ...(c.crl ? { crl: c.crl } : {}),
    requestCert: c.verifyPeer,
    rejectUnauthorized: c.verifyPeer,
  };
}

/**
 * The upgrade function for NbdServer: runs the server side of the TLS
 * handshake on the plaintext socket and resolves with the TLS socket and
 * the client's identity. On failure the socket is destroyed and the promise
 * rejects with NbdTlsError (the message says why: unknown PSK identity,
 * certificate refused, no shared cipher, ...).
 */
export function tlsUpgrader(c: TlsCredentials): (socket: Socket) => Promise<TlsUpgrade> {
  const options = contextOptions(c);
  return (raw) => new Promise<TlsUpgrade>((resolve, reject) => {
    let pskIdentity: string | null = null;
    let unknownIdentity: string | null = null;
    const server = tls.createServer({
      ...options,
      ...(c.kind === 'psk' ? {
        pskCallback: (_socket: tls.TLSSocket, identity: string) => {
          const key = c.keys.get(identity);
          if (key) pskIdentity = identity;
          else unknownIdentity = identity;
          return key ?? null;
        },
      } : {}),
    });
    server.once('secureConnection', (socket: tls.TLSSocket) => {
      server.removeAllListeners('tlsClientError');
      const peer = peerOf(c, socket, pskIdentity);
      if (typeof peer === 'string') {
        socket.destroy();
        reject(new NbdTlsError(`TLS: ${peer}`));
        return;
      }
      peer.session = `${socket.getProtocol() ?? '?'} ${socket.getCipher()?.standardName ?? '?'}`;
      resolve({ socket, peer });
    });
    server.once('tlsClientError', (err: Error, socket: tls.TLSSocket) => {
      server.removeAllListeners('secureConnection');
      socket.destroy();
      reject(new NbdTlsError(`TLS handshake failed: ${whyFailed(err, socket, pskIdentity, unknownIdentity)}`, { cause: err }));
    });
    server.emit('connection', raw);
  });
}

/** The client's identity once the handshake is done, or why it cannot be accepted. */
function peerOf(c: TlsCredentials, socket: tls.TLSSocket, pskIdentity: string | null): TlsPeer | string {
  if (c.kind === 'psk') {
    // Without a server certificate only a PSK handshake can complete; checked anyway.
    return pskIdentity === null ? 'session completed without a pre-shared key' : { method: 'psk', name: pskIdentity };
  }
  if (!c.verifyPeer) return { method: 'none', name: '' };
  if (!socket.authorized) return `client certificate refused: ${String(socket.authorizationError ?? 'not verified')}`;
  const x509 = socket.getPeerX509Certificate();
  if (!x509) return 'no client certificate';
  const cn = socket.getPeerCertificate().subject?.CN;
  return { method: 'x509', name: (Array.isArray(cn) ? cn[cn.length - 1] : cn) ?? '', dn: rfc4514(x509.subject) };
}

/**
 * Node writes a subject one attribute a line, in certificate order
 * ("C=GB\nO=Example\nCN=host1", values escaped as RFC 2253 says); RFC 4514
 * (and gnutls, so QEMU's authz lists) writes it most specific first,
 * comma-separated: "CN=host1,O=Example,C=GB".
 */
export function rfc4514(subject: string): string {
  return subject.split('\n').filter((l) => l !== '').reverse().join(',');
}

function whyFailed(err: Error, socket: tls.TLSSocket, pskIdentity: string | null, unknownIdentity: string | null): string {
  if (socket.authorizationError) return `client certificate refused: ${String(socket.authorizationError)}`;
  if (unknownIdentity !== null && pskIdentity === null) return `unknown PSK identity ${JSON.stringify(unknownIdentity)}`;
  const why = openSslReason(err);
  return pskIdentity !== null ? `${why} (PSK identity ${JSON.stringify(pskIdentity)}: wrong key?)` : why;
}

/** OpenSSL's reason ("no shared cipher") rather than its whole error string. */
function openSslReason(err: unknown): string {
  const e = err as { reason?: unknown; message?: unknown; code?: unknown };
  if (typeof e.reason === 'string' && e.reason !== '') return e.reason;
  if (e.code === 'ECONNRESET') return 'the client closed the connection';
  return String(e.message ?? err);
}
