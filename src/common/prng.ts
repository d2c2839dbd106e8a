/**
 * mulberry32: a small seeded PRNG, reproducible from a u32 seed. For tests,
 * fuzzing and simulated power cuts; never for anything secret.
 */

/** Uniform u32 values. */
export function mulberry32u32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return (x ^ (x >>> 14)) >>> 0;
  };
}

/** Uniform in [0, 1). */
export function mulberry32(seed: number): () => number {
  const next = mulberry32u32(seed);
  return () => next() / 4294967296;
}
