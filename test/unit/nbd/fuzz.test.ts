/**
 * Structure-aware fuzzing of the NBD server (test/helpers/nbd-fuzz.ts):
 * mutated real sessions over many connections, a witness connection that
 * must keep working, no leaked connections, bounded memory.
 *
 *   ARCHIPELAGO_FUZZ_SEED=<u32>     replay a run (the seed is printed)
 *   ARCHIPELAGO_FUZZ_FRAMES=<n>     frames to send (default 3000, < 30 s)
 */
import t from 'tap';
import { startTestServer } from '../../helpers/nbd-server.js';
import { FuzzFailure, runFuzz } from '../../helpers/nbd-fuzz.js';

const MiB = 1024 * 1024;

const seed = process.env.ARCHIPELAGO_FUZZ_SEED !== undefined
  ? Number(process.env.ARCHIPELAGO_FUZZ_SEED) >>> 0
  : (Date.now() ^ (process.pid << 16)) >>> 0;
const frames = Number(process.env.ARCHIPELAGO_FUZZ_FRAMES ?? 3000);

t.test(`fuzz (ARCHIPELAGO_FUZZ_SEED=${seed} ARCHIPELAGO_FUZZ_FRAMES=${frames})`, async (t) => {
  t.comment(`seed ${seed}: replay with ARCHIPELAGO_FUZZ_SEED=${seed}`);
  const { port, server } = await startTestServer(t, (p) => {
    p.addMemory('fuzz', 8 * MiB);
    p.addMemory('witness', 4 * MiB);
  }, { handshakeTimeoutMs: 2000 });
  try {
    const r = await runFuzz({
      port, seed, frames, exportName: 'fuzz', witnessExport: 'witness',
      connectionCount: () => server.connectionCount,
      log: (line) => t.comment(line),
    });
    t.comment(`${r.sessions} sessions (${r.parallelBatches} parallel batches), ${r.frames} frames in ${r.ms} ms; ` +
      `${r.closedByServer} closed by the server, ${r.gaveUp} given up; memory +${(r.memoryGrowth / MiB).toFixed(1)} MiB`);
    t.comment(`mutations ${JSON.stringify(r.mutations)}; truncated at ${JSON.stringify(r.truncatedAt)}`);
    t.ok(r.frames >= frames, `sent ${r.frames} frames`);
    t.equal(r.witnessChecks, r.batches, 'the witness was checked after every batch');
    t.ok(r.closedByServer > 0 && r.gaveUp > 0, 'both ways of ending a session happened');
    t.ok(r.parallelBatches > 0, 'some sessions ran in parallel');
    const end = Date.now() + 2000;
    while (server.connectionCount > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 10));
    t.equal(server.connectionCount, 0, 'no connection left once the witness is gone');
  } catch (err) {
    if (err instanceof FuzzFailure) t.fail(err.message, { seed: err.seed, session: err.session });
    else throw err;
  }
});
