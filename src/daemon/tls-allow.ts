/**
 * The TLS allow-list (`tls-allow` setting): which clients, by the identity
 * they proved in the TLS handshake, may open which exports. Format, version 1
 * (docs/tls.md has examples):
 *
 *   # comment lines start with "#"; blank lines are skipped
 *   version 1
 *   psk:alice                 vm-alice-*  scratch
 *   cn:host1.example.com      vm-host1-*
 *   "dn:CN=host2,O=Example Corp,C=GB"   vm-host2-*
 *   *                         public-*
 *   anonymous                 iso-*
 *
 * The first line that is not blank or a comment is `version 1`. Every other
 * line is an identity, then one or more export-name globs, separated by
 * spaces or tabs. An identity is one of:
 *
 *   psk:NAME    the client used the pre-shared key of identity NAME
 *   cn:NAME     the client's certificate verified and its subject CN is NAME
 *   dn:DN       the same, with the whole subject DN, RFC 4514 order
 *               (`openssl x509 -noout -subject -nameopt RFC2253` prints it)
 *   *           any client that authenticated (PSK or verified certificate)
 *   anonymous   a client without an identity: plaintext (tls = on) or TLS
 *               without a client certificate (tls-verify-peer = false)
 *
 * An identity with spaces is written as a JSON string ("dn:…"). A glob
 * matches a whole export name; `*` is any run of characters, `?` any one,
 * everything else stands for itself. A client may open an export when any
 * line naming its identity has a glob matching the export's name; lines
 * add up, and nothing else is allowed. Without a `tls-allow` file every
 * client (that passed the TLS mode) may open every export.
 *
 * Why not a library glob (minimatch, picomatch): they match paths (`*`
 * stops at "/", braces, extglobs), which export names are not; two
 * metacharacters need ten lines.
 */
import fs from 'node:fs/promises';
import type { TlsPeer } from '../nbd/server.js';

export const ALLOW_LIST_VERSION = 1;

type Who =
  | { kind: 'psk' | 'cn' | 'dn'; value: string }
  | { kind: 'any' }
  | { kind: 'anonymous' };

export interface AllowRule {
  /** The identity as written (for messages). */
  identity: string;
  who: Who;
  globs: string[];
  patterns: RegExp[];
  line: number;
}

export interface AllowList {
  path: string;
  rules: AllowRule[];
  /** May this client (null: plaintext) open export `name`? */
  allows(peer: TlsPeer | null, name: string): boolean;
}

/** A bad allow-list file; the message names file:line. */
export class AllowListError extends Error {
  readonly code = 'ARCH_E_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'AllowListError';
  }
}

/** Does identity `who` describe this client? */
function matches(who: Who, peer: TlsPeer | null): boolean {
  switch (who.kind) {
    case 'anonymous': return peer === null || peer.method === 'none';
    case 'any': return peer !== null && peer.method !== 'none';
    case 'psk': return peer?.method === 'psk' && peer.name === who.value;
    case 'cn': return peer?.method === 'x509' && peer.name === who.value;
    case 'dn': return peer?.method === 'x509' && peer.dn === who.value;
  }
}

/** A glob as an anchored regular expression: `*` any run, `?` one character. */
export function globToRegExp(glob: string): RegExp {
  let re = '';
  for (const c of glob) re += c === '*' ? '.*' : c === '?' ? '.' : c.replace(/[\\^$.|+()[\]{}]/g, '\\$&');
  return new RegExp(`^${re}$`, 's');
}

function parseWho(identity: string): Who | string {
  if (identity === '*') return { kind: 'any' };
  if (identity === 'anonymous') return { kind: 'anonymous' };
  const m = /^(psk|cn|dn):(.+)$/s.exec(identity);
  if (!m) return 'expected psk:NAME, cn:NAME, dn:DN, * or anonymous';
  return { kind: m[1] as 'psk' | 'cn' | 'dn', value: m[2]! };
}

/** Splits off the first token: a JSON string or a run of non-blanks. */
function firstToken(text: string): { token: string; rest: string } | string {
  if (text.startsWith('"')) {
    // The shortest prefix that is a complete JSON string.
    for (let i = 1; i < text.length; i++) {
      if (text[i] === '\\') { i++; continue; }
      if (text[i] === '"') {
        let token: unknown;
        try { token = JSON.parse(text.slice(0, i + 1)); } catch { return 'a quoted identity must be a JSON string'; }
        return { token: token as string, rest: text.slice(i + 1) };
      }
    }
    return 'unterminated quoted identity';
  }
  const m = /^(\S+)(.*)$/s.exec(text)!;
  return { token: m[1]!, rest: m[2]! };
}

/** Parses an allow-list; throws AllowListError "PATH:LINE: what". */
export function parseAllowList(text: string, path: string): AllowList {
  const rules: AllowRule[] = [];
  let version: number | null = null;
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const n = i + 1;
    const bad = (why: string) => new AllowListError(`${path}:${n}: ${why}`);
    const line = lines[i]!.replace(/\r$/, '').trim();
    if (line === '' || line.startsWith('#')) continue;
    if (version === null) {
      const m = /^version\s+(\d+)$/.exec(line);
      if (!m) throw bad(`expected "version ${ALLOW_LIST_VERSION}" before the first rule`);
      version = Number(m[1]);
      if (version !== ALLOW_LIST_VERSION) throw bad(`allow-list version ${version} is not supported (this archipelago reads version ${ALLOW_LIST_VERSION})`);
      continue;
    }
    const first = firstToken(line);
    if (typeof first === 'string') throw bad(first);
    const who = parseWho(first.token);
    if (typeof who === 'string') throw bad(`identity ${JSON.stringify(first.token)}: ${who}`);
    const globs = first.rest.trim().split(/\s+/).filter(Boolean);
    if (globs.length === 0) throw bad(`identity ${JSON.stringify(first.token)} names no export (add one or more export-name globs)`);
    for (const g of globs) if (g.includes('"')) throw bad(`export glob ${JSON.stringify(g)}: quotes are not allowed in globs`);
    rules.push({ identity: first.token, who, globs, patterns: globs.map(globToRegExp), line: n });
  }
  if (version === null) throw new AllowListError(`${path}: empty allow-list: the first line must be "version ${ALLOW_LIST_VERSION}"`);
  return {
    path,
    rules,
    allows: (peer, name) => rules.some((r) => matches(r.who, peer) && r.patterns.some((p) => p.test(name))),
  };
}

/** Reads and parses the allow-list file; a missing or unreadable file is an AllowListError. */
export async function loadAllowList(path: string): Promise<AllowList> {
  let text: string;
  try {
    text = await fs.readFile(path, 'utf8');
  } catch (err) {
    throw new AllowListError(`tls-allow ${path}: ${describeFsError(err)}`);
  }
  return parseAllowList(text, path);
}

/** "no such file", "permission denied", "is a directory", or the message. */
export function describeFsError(err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'ENOENT' ? 'no such file' : code === 'EACCES' ? 'permission denied' : code === 'EISDIR' ? 'is a directory'
    : (err as Error).message;
}
