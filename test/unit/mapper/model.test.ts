/**
 * The map model (test/helpers/map-model.ts) on the memory blocker, whose
 * crash is a power cut: each object with unsynced changes keeps them or
 * falls back to its last synced state (seeded per run).
 */
import t from 'tap';
import { MemoryBlocker } from '../../../src/blockers/memory.js';
import { modelSeeds, modelSteps, runMapModel, type ModelStorage } from '../../helpers/map-model.js';

class MemoryStorage implements ModelStorage {
  blocker: MemoryBlocker;
  constructor(seed: number) {
    this.blocker = new MemoryBlocker({ seed });
  }

  async reopen(): Promise<void> {
    await this.blocker.close();
    this.blocker = this.blocker.reopen();
  }

  async crash(abandon: () => Promise<void>): Promise<string> {
    const b = this.blocker;
    const dirty = b.dirtyNames().length;
    b.powerCut({ keepUnsynced: 'random' });
    // Closing the abandoned Volumes must write nothing: all were flushed and no commit is pending.
    const writes = () => b.calls.write + b.calls.replace + b.calls.remove;
    const before = writes();
    await abandon();
    if (writes() !== before) throw new Error('closing after a flush wrote to the store');
    await this.reopen();
    return `power cut (${dirty} unsynced objects)`;
  }

  async destroy(): Promise<void> {
    await this.blocker.close();
  }
}

await runMapModel(t, modelSeeds([1, 2, 3]), modelSteps(300), async (seed) => new MemoryStorage(seed));
