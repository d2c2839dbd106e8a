/**
 * The fixed-newstyle handshake (doc/proto.md, "Newstyle negotiation" and
 * "Option types"): greeting, client flags, then a bounded loop of options with
 * one handler per NBD_OPT_*, until GO or EXPORT_NAME enter transmission.
 *
 * Rules (after nbdkit's protocol-handshake-newstyle.c):
 * - a malformed option gets ERR_INVALID and negotiation goes on; an unknown
 *   one gets ERR_UNSUP; only bad magic, unknown client flags, an unsatisfiable
 *   EXPORT_NAME or a denial of service end the connection;
 * - the export is opened only at GO/EXPORT_NAME (and briefly for INFO), so an
 *   idle or hostile client costs nothing behind the server;
 * - option data is bounded; larger options are drained and answered TOO_BIG.
 *
 * TLS (doc/proto.md "TLS support"; modes in tls.ts): STARTTLS is ACKed, the
 * connection upgrades the socket (HandshakeIO.startTls) and negotiation goes
 * on over TLS from a clean slate (no structured replies, no meta context:
 * the spec forbids keeping state from before). Before TLS a TLS-required
 * server answers every option but STARTTLS and ABORT with ERR_TLS_REQD. The
 * client's identity (plaintext, or its TLS peer) decides which exports it
 * may see and open: LIST omits the others, INFO/GO refuse them with
 * ERR_TLS_REQD before TLS (the export may open after an upgrade) and
 * ERR_POLICY after, EXPORT_NAME ends the connection. Access is checked
 * before an export is looked up, so a refused client cannot tell an
 * existing export from a missing one.
 */
import {
  BASE_ALLOCATION, MAX_STRING_LENGTH, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY, NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO, NBD_OPT, NBD_REP, OPTION_HEADER_LENGTH, nameOfOpt,
} from './constants.js';
import { NbdProtocolError, describeError } from './errors.js';
import type { Export, ExportProvider } from './export.js';
import { describePeer, type NbdTls, type TlsPeer } from './tls.js';
import {
  decodeString, encodeExportNameReply, encodeGreeting, encodeInfoBlockSize, encodeInfoExport,
  encodeInfoString, encodeOptionError, encodeOptionReply, encodeRepMetaContext, encodeRepServer,
  parseInfoRequest, parseMetaContextRequest, parseOptionHeader,
} from './wire.js';
import type { Logger } from '../common/log.js';

/** The context id this server gives `base:allocation`; opaque to clients. */
export const BASE_ALLOCATION_ID = 1;

/** What the handshake needs from the connection: exact reads and writes. */
export interface HandshakeIO {
  /** Resolves with exactly `n` bytes; rejects when the peer goes away. */
  read(n: number): Promise<Buffer>;
  /** Reads and discards `n` bytes. */
  skip(n: number): Promise<void>;
  write(data: Buffer): void;
  /**
   * After STARTTLS was ACKed: upgrades the connection to TLS (later reads and
   * writes go through it) and resolves with the client's identity; rejects
   * with NbdTlsError when the TLS handshake fails. Absent: TLS unsupported.
   */
  startTls?(): Promise<TlsPeer>;
}

export interface HandshakeLimits {
  /** Options accepted before the client is deemed abusive (topped up after LIST). */
  maxOptions: number;
  /** Longest option data handled; longer is drained and refused with TOO_BIG. */
  maxOptionLength: number;
  /** Longer option data than this ends the connection (not worth draining). */
  maxDrainLength: number;
}

export const DEFAULT_HANDSHAKE_LIMITS: HandshakeLimits = {
  maxOptions: 128,
  maxOptionLength: 64 * 1024,
  maxDrainLength: 16 * 1024 * 1024,
};

/** The outcome of a successful handshake. */
export interface Negotiated {
  export: Export;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** base:allocation selected for this export (BLOCK_STATUS allowed). */
  baseAllocation: boolean;
}

interface State {
  noZeroes: boolean;
  structuredReplies: boolean;
  /** Export name the meta context selection was made for, or null. */
  metaExport: string | null;
  baseAllocation: boolean;
  optionsLeft: number;
  /** TLS is up (STARTTLS succeeded). */
  tls: boolean;
  /** The client's TLS identity; null while plaintext. */
  peer: TlsPeer | null;
}

export interface HandshakeContext {
  io: HandshakeIO;
  provider: ExportProvider;
  limits: HandshakeLimits;
  log: Logger;
  /** True while the server shuts down: options get ERR_SHUTDOWN. */
  shuttingDown(): boolean;
  /** TLS mode and access policy; null or absent: no TLS (STARTTLS gets ERR_POLICY). */
  tls?: NbdTls | null;
}

/**
 * Runs the handshake. Resolves with the negotiated export, or null when the
 * client ended negotiation (ABORT). Rejects with NbdProtocolError when the
 * connection must be dropped.
 */
export async function negotiate(ctx: HandshakeContext): Promise<Negotiated | null> {
  const { io } = ctx;
  io.write(encodeGreeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES));
  const clientFlags = (await io.read(4)).readUInt32BE(0);
  if (clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
    throw new NbdProtocolError(`handshake: unknown client flags 0x${clientFlags.toString(16)}`);
  }
  const st: State = {
    noZeroes: (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0,
    structuredReplies: false,
    metaExport: null,
    baseAllocation: false,
    optionsLeft: ctx.limits.maxOptions,
    tls: false,
    peer: null,
  };
  const fixed = (clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;

  for (;;) {
    if (st.optionsLeft-- <= 0) throw new NbdProtocolError('handshake: too many options');
    const h = parseOptionHeader(await io.read(OPTION_HEADER_LENGTH));
    if (!h.magicOk) throw new NbdProtocolError('handshake: bad option magic');
    const opt = h.option;
    if (h.length > ctx.limits.maxOptionLength) {
      if (h.length > ctx.limits.maxDrainLength || opt === NBD_OPT.EXPORT_NAME) {
        throw new NbdProtocolError(`handshake: ${nameOfOpt(opt)}: option length ${h.length} too large`);
      }
      await io.skip(h.length);
      io.write(encodeOptionError(opt, NBD_REP.ERR_TOO_BIG, `${nameOfOpt(opt)}: option data of ${h.length} bytes is too large`));
      continue;
    }
    const data = h.length ? await io.read(h.length) : EMPTY;
    ctx.log.debug('handshake: option', { option: nameOfOpt(opt), length: h.length });

    if (!fixed && opt !== NBD_OPT.EXPORT_NAME) {
      // Plain newstyle clients cannot parse option replies.
      throw new NbdProtocolError(`handshake: ${nameOfOpt(opt)} from a client without fixed newstyle`);
    }
    if (ctx.shuttingDown() && opt !== NBD_OPT.ABORT) {
      if (opt === NBD_OPT.EXPORT_NAME) throw new NbdProtocolError('handshake: server shutting down');
      io.write(encodeOptionError(opt, NBD_REP.ERR_SHUTDOWN, 'server is shutting down'));
      continue;
    }
    if (ctx.tls?.mode === 'required' && !st.tls && opt !== NBD_OPT.STARTTLS && opt !== NBD_OPT.ABORT) {
      // FORCEDTLS: EXPORT_NAME has no error reply, so it can only end the connection.
      if (opt === NBD_OPT.EXPORT_NAME) throw new NbdProtocolError('handshake: NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS');
      io.write(encodeOptionError(opt, NBD_REP.ERR_TLS_REQD, `${nameOfOpt(opt)}: this server requires TLS: send NBD_OPT_STARTTLS first`));
      continue;
    }

    switch (opt) {
      case NBD_OPT.EXPORT_NAME:
        return optExportName(ctx, st, data);
      case NBD_OPT.ABORT:
        io.write(encodeOptionReply(opt, NBD_REP.ACK));
        return null;
      case NBD_OPT.LIST:
        await optList(ctx, st, data);
        break;
      case NBD_OPT.STARTTLS:
        await optStartTls(ctx, st, data);
        break;
      case NBD_OPT.INFO:
      case NBD_OPT.GO: {
        const result = await optInfoGo(ctx, st, opt, data);
        if (result) return result;
        break;
      }
      case NBD_OPT.STRUCTURED_REPLY:
        if (data.length) {
          io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, 'STRUCTURED_REPLY: option carries no data'));
        } else {
          st.structuredReplies = true;
          io.write(encodeOptionReply(opt, NBD_REP.ACK));
        }
        break;
      case NBD_OPT.LIST_META_CONTEXT:
      case NBD_OPT.SET_META_CONTEXT:
        await optMetaContext(ctx, st, opt, data);
        break;
      default:
        io.write(encodeOptionError(opt, NBD_REP.ERR_UNSUP, `${nameOfOpt(opt)}: option not supported`));
    }
  }
}

const EMPTY = Buffer.alloc(0);

/** Transmission flags for an export, from its capabilities (never advertise what it lacks). */
export function transmissionFlagsFor(exp: Export, structuredReplies: boolean): number {
  const c = exp.capabilities;
  let f = NBD_FLAG_HAS_FLAGS;
  if (exp.readOnly) f |= NBD_FLAG_READ_ONLY;
  if (c.flush) f |= NBD_FLAG_SEND_FLUSH;
  if (c.fua) f |= NBD_FLAG_SEND_FUA;
  if (c.rotational) f |= NBD_FLAG_ROTATIONAL;
  if (!exp.readOnly && c.trim) f |= NBD_FLAG_SEND_TRIM;
  if (!exp.readOnly && c.zero) {
    f |= NBD_FLAG_SEND_WRITE_ZEROES;
    if (c.fastZero) f |= NBD_FLAG_SEND_FAST_ZERO;
  }
  if (structuredReplies) f |= NBD_FLAG_SEND_DF;
  if (c.multiConn) f |= NBD_FLAG_CAN_MULTI_CONN;
  if (c.cache) f |= NBD_FLAG_SEND_CACHE;
  return f;
}

/** The export a client-supplied name selects ('' = the default), or null for none. */
function resolveName(ctx: HandshakeContext, name: string): string | null {
  const resolved = name === '' ? ctx.provider.defaultExport : name;
  return resolved === undefined || resolved === null || resolved === '' ? null : resolved;
}

/** May this client (its TLS identity, or plaintext) open export `resolved`? */
function mayOpen(ctx: HandshakeContext, st: State, resolved: string): boolean {
  const authorize = ctx.tls?.authorize;
  return authorize === undefined || authorize(st.peer, resolved);
}

/**
 * Refuses INFO/GO on an export this client may not open: before TLS the
 * export counts as TLS-only (ERR_TLS_REQD; SELECTIVETLS), after it the
 * answer is ERR_POLICY.
 */
function refuseExport(ctx: HandshakeContext, st: State, opt: number, resolved: string): void {
  const what = nameOfOpt(opt);
  const identity = describePeer(st.peer);
  ctx.log.info(`handshake: ${what}: export ${JSON.stringify(resolved)} refused to ${identity}`, { export: resolved, identity });
  ctx.io.write(st.tls
    ? encodeOptionError(opt, NBD_REP.ERR_POLICY, `${what}: export ${JSON.stringify(resolved)} is not open to ${identity}`)
    : encodeOptionError(opt, NBD_REP.ERR_TLS_REQD, `${what}: export ${JSON.stringify(resolved)} requires TLS: send NBD_OPT_STARTTLS first`));
}

/** Opens an export by its resolved name; null when unknown. */
async function openExport(ctx: HandshakeContext, resolved: string | null): Promise<Export | null> {
  if (resolved === null) return null;
  try {
    return await ctx.provider.open(resolved);
  } catch (err) {
    ctx.log.warn(`handshake: open export ${JSON.stringify(resolved)}: ${describeError(err)}`, { err });
    return null;
  }
}

/** NBD_OPT_EXPORT_NAME: no error reply exists, so failure ends the connection. */
async function optExportName(ctx: HandshakeContext, st: State, data: Buffer): Promise<Negotiated> {
  const name = decodeString(data);
  if (name === null) throw new NbdProtocolError('handshake: NBD_OPT_EXPORT_NAME: invalid export name');
  const resolved = resolveName(ctx, name);
  if (resolved !== null && !mayOpen(ctx, st, resolved)) {
    throw new NbdProtocolError(`handshake: NBD_OPT_EXPORT_NAME: export ${JSON.stringify(resolved)} is not open to ${describePeer(st.peer)}`);
  }
  const exp = await openExport(ctx, resolved);
  if (!exp) throw new NbdProtocolError(`handshake: NBD_OPT_EXPORT_NAME: unknown export ${JSON.stringify(name)}`);
  // Meta contexts negotiated for another export do not apply (spec: NBD_OPT_SET_META_CONTEXT).
  const baseAllocation = st.baseAllocation && st.metaExport === name;
  const flags = transmissionFlagsFor(exp, st.structuredReplies);
  ctx.io.write(encodeExportNameReply(exp.size, flags, st.noZeroes));
  return { export: exp, transmissionFlags: flags, structuredReplies: st.structuredReplies, baseAllocation };
}

/**
 * NBD_OPT_STARTTLS: ACK, then the TLS handshake; negotiation goes on over
 * TLS with nothing kept from before (spec). Refused with ERR_POLICY when
 * TLS is not configured, ERR_INVALID when it is already up. A failed TLS
 * handshake rejects (NbdTlsError): past the ACK there is no plaintext to
 * return to, so the connection ends.
 */
async function optStartTls(ctx: HandshakeContext, st: State, data: Buffer): Promise<void> {
  const opt = NBD_OPT.STARTTLS;
  const { io } = ctx;
  if (data.length) {
    io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, 'STARTTLS: option carries no data'));
    return;
  }
  if (!ctx.tls || !io.startTls) {
    io.write(encodeOptionError(opt, NBD_REP.ERR_POLICY, 'STARTTLS: TLS is not configured on this server'));
    return;
  }
  if (st.tls) {
    io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, 'STARTTLS: TLS is already active'));
    return;
  }
  io.write(encodeOptionReply(opt, NBD_REP.ACK));
  st.peer = await io.startTls();
  st.tls = true;
  st.structuredReplies = false;
  st.metaExport = null;
  st.baseAllocation = false;
  ctx.log.debug('handshake: TLS established', { identity: describePeer(st.peer), ...(st.peer.session ? { session: st.peer.session } : {}) });
}

/** NBD_OPT_LIST: one NBD_REP_SERVER per export this client may open, then ACK. */
async function optList(ctx: HandshakeContext, st: State, data: Buffer): Promise<void> {
  const opt = NBD_OPT.LIST;
  if (data.length) {
    ctx.io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, 'LIST: option carries no data'));
    return;
  }
  let exports;
  try {
    exports = await ctx.provider.list();
  } catch (err) {
    ctx.log.warn(`handshake: NBD_OPT_LIST: ${describeError(err)}`, { err });
    ctx.io.write(encodeOptionError(opt, NBD_REP.ERR_SHUTDOWN, 'LIST: exports cannot be listed now'));
    return;
  }
  // Only what this client may open (SELECTIVETLS: TLS-only exports are omitted before TLS).
  exports = exports.filter((e) => mayOpen(ctx, st, e.name));
  for (const e of exports) ctx.io.write(encodeOptionReply(opt, NBD_REP.SERVER, encodeRepServer(e.name, e.description)));
  ctx.io.write(encodeOptionReply(opt, NBD_REP.ACK));
  // A client that lists may then ask INFO for each export (nbdinfo --list).
  st.optionsLeft += exports.length;
}

/** NBD_OPT_INFO and NBD_OPT_GO: describe the export; GO also enters transmission. */
async function optInfoGo(ctx: HandshakeContext, st: State, opt: number, data: Buffer): Promise<Negotiated | null> {
  const { io } = ctx;
  const req = parseInfoRequest(data);
  const what = nameOfOpt(opt);
  if (typeof req === 'string') {
    io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, `${what}: ${req}`));
    return null;
  }
  const resolved = resolveName(ctx, req.name);
  if (resolved !== null && !mayOpen(ctx, st, resolved)) {
    refuseExport(ctx, st, opt, resolved);
    return null;
  }
  const exp = await openExport(ctx, resolved);
  if (!exp) {
    // Not a failure (the client may go on, or was probing for a volume about
    // to appear), but what an operator needs to see of a failed attach.
    ctx.log.info(`handshake: ${what}: unknown export ${JSON.stringify(req.name)}`, { export: req.name });
    io.write(encodeOptionError(opt, NBD_REP.ERR_UNKNOWN, `${what}: unknown export ${JSON.stringify(req.name)}`));
    return null;
  }
  const flags = transmissionFlagsFor(exp, st.structuredReplies);
  io.write(encodeOptionReply(opt, NBD_REP.INFO, encodeInfoExport(exp.size, flags)));
  const wanted = new Set(req.infos);
  if (wanted.has(NBD_INFO.NAME)) io.write(encodeOptionReply(opt, NBD_REP.INFO, encodeInfoString(NBD_INFO.NAME, exp.name)));
  if (wanted.has(NBD_INFO.DESCRIPTION) && exp.description) {
    io.write(encodeOptionReply(opt, NBD_REP.INFO, encodeInfoString(NBD_INFO.DESCRIPTION, exp.description)));
  }
  // Offered whether asked or not: the defaults (min 1, preferred 4096, max 32 MiB) are ours too.
  const bs = exp.blockSize;
  io.write(encodeOptionReply(opt, NBD_REP.INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum)));
  io.write(encodeOptionReply(opt, NBD_REP.ACK));
  if (opt === NBD_OPT.INFO) {
    await exp.close();
    return null;
  }
  const baseAllocation = st.baseAllocation && st.metaExport === req.name;
  return { export: exp, transmissionFlags: flags, structuredReplies: st.structuredReplies, baseAllocation };
}

/** NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT; only `base:allocation` exists. */
async function optMetaContext(ctx: HandshakeContext, st: State, opt: number, data: Buffer): Promise<void> {
  const { io } = ctx;
  const what = nameOfOpt(opt);
  const isSet = opt === NBD_OPT.SET_META_CONTEXT;
  if (isSet && !st.structuredReplies) {
    io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, `${what}: structured replies must be negotiated first`));
    return;
  }
  const req = parseMetaContextRequest(data);
  if (typeof req === 'string') {
    io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, `${what}: ${req}`));
    return;
  }
  for (const q of req.queries) {
    if (Buffer.byteLength(q) > MAX_STRING_LENGTH) {
      io.write(encodeOptionError(opt, NBD_REP.ERR_INVALID, `${what}: query too long`));
      return;
    }
  }
  const resolved = resolveName(ctx, req.name);
  if (resolved !== null && !mayOpen(ctx, st, resolved)) {
    // Not ERR_TLS_REQD: the spec allows that only for INFO, GO and EXPORT_NAME.
    io.write(encodeOptionError(opt, NBD_REP.ERR_POLICY, `${what}: export ${JSON.stringify(resolved)} is not open to ${describePeer(st.peer)}`));
    return;
  }
  const exp = await openExport(ctx, resolved);
  if (!exp) {
    io.write(encodeOptionError(opt, NBD_REP.ERR_UNKNOWN, `${what}: unknown export ${JSON.stringify(req.name)}`));
    return;
  }
  await exp.close();

  let selected = false;
  if (isSet) {
    selected = req.queries.includes(BASE_ALLOCATION);
  } else {
    // LIST: no query means "all"; `base:` is a namespace wildcard for LIST only.
    selected = req.queries.length === 0 || req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
  }
  if (selected) io.write(encodeOptionReply(opt, NBD_REP.META_CONTEXT, encodeRepMetaContext(BASE_ALLOCATION_ID, BASE_ALLOCATION)));
  io.write(encodeOptionReply(opt, NBD_REP.ACK));
  if (isSet) {
    // SET replaces any earlier selection.
    st.baseAllocation = selected;
    st.metaExport = req.name;
  }
}
