/**
 * The contract between the NBD server and whatever it serves.
 *
 * src/nbd/ knows nothing of volumes, maps or object stores: it serves any
 * `Export` handed to it by an `ExportProvider`. The server validates every
 * request against the export's size, read-only flag and capabilities before
 * calling it, so an implementation may assert (not re-check) that a range is
 * inside the export and that a write is allowed.
 *
 * Offsets and lengths are plain numbers: exports are below 2^53 bytes (8 PiB),
 * which the server enforces when it parses 64-bit wire fields.
 *
 * Errors: an implementation rejects with an Error whose `code` is an errno name
 * ('EIO', 'ENOSPC', 'EPERM', 'ENOTSUP', 'ESHUTDOWN', ...). The server maps it to
 * an NBD error in exactly one place (errors.ts) after logging the real cause.
 * Anything without a known code becomes EIO.
 */

/** Flags of one block-status extent, as `base:allocation` defines them. */
export const ExtentFlags = {
  /** Reading returns zeros and no storage is allocated. */
  HOLE: 1,
  /** Reading returns zeros (allocated or not). */
  ZERO: 2,
} as const;

/** One run of the export with uniform allocation state. */
export interface Extent {
  length: number;
  /** Bitwise OR of ExtentFlags; 0 = allocated data. */
  flags: number;
}

/**
 * A piece of a READ result. `data` absent means a hole that reads as zeros: the
 * server sends it as an OFFSET_HOLE chunk when structured replies are on, and as
 * zero bytes otherwise. Pieces are in ascending order, do not overlap and cover
 * the requested range exactly.
 */
export interface ReadPiece {
  offset: number;
  length: number;
  data?: Buffer;
}

/** Size limits a client must respect (NBD_INFO_BLOCK_SIZE). */
export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** What an export can do; the server advertises exactly these. */
export interface ExportCapabilities {
  flush: boolean;
  fua: boolean;
  trim: boolean;
  zero: boolean;
  /** WRITE_ZEROES with FAST_ZERO: fail quickly with ENOTSUP when not faster than a write. */
  fastZero: boolean;
  cache: boolean;
  /** FLUSH/FUA on one connection covers writes replied to on every connection. */
  multiConn: boolean;
  /** base:allocation is meaningful (holes are tracked). */
  blockStatus: boolean;
  rotational: boolean;
}

export interface ZeroOptions {
  fua: boolean;
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole: boolean;
  /** Fail with ENOTSUP rather than write zeros slowly (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero: boolean;
}

/** One open export, as seen by one connection. */
export interface Export {
  readonly name: string;
  readonly description?: string;
  /** Size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  readonly capabilities: ExportCapabilities;
  readonly blockSize: BlockSize;

  read(offset: number, length: number): Promise<ReadPiece[]>;
  /** `data` is a view into the connection's receive buffer: copy it to keep it past the returned promise. */
  write(offset: number, data: Buffer, fua: boolean): Promise<void>;
  /** Every write that completed before this call is durable when it resolves. */
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, options: ZeroOptions): Promise<void>;
  /** Extents from `offset`, in order, covering at least one byte and at most `length` bytes. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Hint: prefetch the range. */
  cache(offset: number, length: number): Promise<void>;
  /** Called once when the connection that opened it ends. */
  close(): Promise<void>;
}

/** A short description for NBD_OPT_LIST. */
export interface ExportListing {
  name: string;
  description?: string;
}

/** Where the server finds exports by name. */
export interface ExportProvider {
  list(): Promise<ExportListing[]>;
  /**
   * Opens an export for one connection; resolves null when no export has that
   * name. `name` is the client's string, unvalidated: providers check it.
   */
  open(name: string): Promise<Export | null>;
  /** The export an empty name selects, or null for none. */
  readonly defaultExport?: string;
}
