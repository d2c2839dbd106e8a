/**
 * src/compose/extents.ts: splitRange checked exhaustively for small object
 * sizes (every offset and length up to 64), plus a few large values where
 * float arithmetic could go wrong.
 */
import t, { type Test } from 'tap';
import { splitRange, type ObjectExtent } from '../../../src/compose/extents.js';

/** Every property of a split, as one failure message (or null). */
function problem(offset: number, length: number, objectSize: number, out: ObjectExtent[]): string | null {
  if (length === 0) return out.length === 0 ? null : 'length 0 gave extents';
  let pos = offset;
  let requestOffset = 0;
  for (const [i, e] of out.entries()) {
    if (e.length <= 0) return `extent ${i}: empty`;
    const start = e.index * objectSize + e.offset;
    if (start !== pos) return `extent ${i}: starts at ${start}, expected ${pos} (gap, overlap or not ascending)`;
    if (e.offset < 0 || e.offset >= objectSize) return `extent ${i}: offset ${e.offset} outside the object`;
    if (e.offset + e.length > objectSize) return `extent ${i}: crosses an object boundary`;
    if (e.requestOffset !== requestOffset) return `extent ${i}: requestOffset ${e.requestOffset}, expected ${requestOffset}`;
    const whole = e.offset === 0 && e.length === objectSize;
    if (e.whole !== whole) return `extent ${i}: whole=${e.whole}, expected ${whole}`;
    if (i > 0 && e.index !== out[i - 1]!.index + 1) return `extent ${i}: index ${e.index} does not follow ${out[i - 1]!.index}`;
    pos += e.length;
    requestOffset += e.length;
  }
  if (pos !== offset + length) return `extents end at ${pos}, expected ${offset + length}`;
  const first = Math.floor(offset / objectSize);
  const last = Math.floor((offset + length - 1) / objectSize);
  if (out.length !== last - first + 1) return `${out.length} extents, expected ${last - first + 1}`;
  return null;
}

function exhaustive(t: Test, objectSize: number): void {
  let checked = 0;
  const failures: string[] = [];
  for (let offset = 0; offset <= 64; offset++) {
    for (let length = 0; length <= 64; length++) {
      const why = problem(offset, length, objectSize, splitRange(offset, length, objectSize));
      if (why !== null && failures.length < 10) failures.push(`splitRange(${offset}, ${length}, ${objectSize}): ${why}`);
      checked++;
    }
  }
  t.same(failures, [], `${checked} ranges over ${objectSize}-byte objects`);
}

for (const objectSize of [1, 2, 8, 16, 64]) {
  t.test(`every offset and length 0..64 over ${objectSize}-byte objects`, async (t) => exhaustive(t, objectSize));
}

t.test('worked examples', async (t) => {
  t.same(splitRange(5, 0, 8), [], 'length 0');
  t.same(splitRange(8, 8, 8), [{ index: 1, offset: 0, length: 8, requestOffset: 0, whole: true }], 'exactly one object');
  t.same(splitRange(6, 20, 8), [
    { index: 0, offset: 6, length: 2, requestOffset: 0, whole: false },
    { index: 1, offset: 0, length: 8, requestOffset: 2, whole: true },
    { index: 2, offset: 0, length: 8, requestOffset: 10, whole: true },
    { index: 3, offset: 0, length: 2, requestOffset: 18, whole: false },
  ], 'head, whole objects, tail');
  t.same(splitRange(3, 2, 16), [{ index: 0, offset: 3, length: 2, requestOffset: 0, whole: false }], 'inside one object');
});

t.test('large offsets (4 MiB objects near 2^53) stay exact', async (t) => {
  const objectSize = 4 * 2 ** 20;
  const top = 2 ** 53 - 1;
  for (const [offset, length] of [
    [top - 3 * objectSize - 17, 3 * objectSize + 17],
    [2 ** 52 + 12345, 2 * objectSize],
    [top - objectSize + 1, objectSize - 1],
    [2 ** 40, objectSize],
  ] as const) {
    const out = splitRange(offset, length, objectSize);
    t.equal(problem(offset, length, objectSize, out), null, `splitRange(${offset}, ${length})`);
  }
  const whole = splitRange(2 ** 40, objectSize, objectSize);
  t.same(whole, [{ index: 2 ** 40 / objectSize, offset: 0, length: objectSize, requestOffset: 0, whole: true }]);
});
