/**
 * Splitting a byte range of a volume into per-object extents: an unaligned
 * head, whole objects, an unaligned tail. Pure arithmetic, no I/O.
 */

export interface ObjectExtent {
  /** Object index in the volume. */
  index: number;
  /** Byte offset inside the object. */
  offset: number;
  length: number;
  /** Offset of this extent inside the request (for slicing payloads). */
  requestOffset: number;
  /** The extent covers the whole object. */
  whole: boolean;
}

/**
 * Extents of [offset, offset+length) over objects of `objectSize` bytes (a
 * power of two), in ascending order. length 0 gives no extent.
 */
export function splitRange(offset: number, length: number, objectSize: number): ObjectExtent[] {
  const out: ObjectExtent[] = [];
  let pos = offset;
  const end = offset + length;
  while (pos < end) {
    const index = Math.floor(pos / objectSize);
    const inObject = pos - index * objectSize;
    const n = Math.min(objectSize - inObject, end - pos);
    out.push({ index, offset: inObject, length: n, requestOffset: pos - offset, whole: n === objectSize });
    pos += n;
  }
  return out;
}
