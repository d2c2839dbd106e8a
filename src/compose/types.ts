/**
 * Result shapes of volume I/O. They match src/nbd/export.ts structurally, so a
 * Volume can be served as an NBD export without compose importing nbd (the
 * layer above it).
 */

/** A piece of a read: `data` absent means zeros that are not stored (a hole). */
export interface ReadPiece {
  offset: number;
  length: number;
  data?: Buffer;
}

/** block status: flags 0 = data, 3 = hole+zero (base:allocation bits). */
export interface Extent {
  length: number;
  flags: number;
}

export const HOLE_ZERO = 3;

export interface ZeroOptions {
  fua: boolean;
  noHole: boolean;
  fastZero: boolean;
}
