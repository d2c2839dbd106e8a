/**
 * A fault-injecting Blocker wrapper, for tests and drills — NEVER on by
 * default (the daemon wraps its store with it only under
 * `serve --fault-injection`, and says so loudly in its log).
 *
 *   caller ──▶ [timeout.ts] ──▶ faulty ──▶ inner blocker
 *                                 │
 *                                 └─ per call: the first rule that matches the
 *                                    operation and object name, and fires (its
 *                                    rate, its limit), decides:
 *                                      fail  — reject with BlockerError(code)
 *                                      delay — wait `delayMs`, then run for real
 *                                      hang  — wait until the rule is cleared
 *
 * Rules live in a FaultController that any number of wrapped blockers share
 * (a RADOS store has two: maps and data), so one set of rules and one set of
 * counters covers the whole store. Rules can be replaced, added and cleared
 * at run time; each keeps its own seeded PRNG (mulberry32, src/common/prng.ts)
 * so a run is reproducible from the seed and the call order.
 *
 * Matching: `ops` (absent: every operation) and `prefix` (absent: every
 * object). `sync(names)` matches when any named object does, `sync()` (all)
 * always matches; `list(prefix)` matches when either prefix extends the other.
 *
 * Released hung operations RUN FOR REAL by default (`clear()`,
 * `setRules()` dropping the rule). That is the safe choice, and the useful one:
 *   - a hung call never reached the backend, so if its caller still waits
 *     (no timeout above us) it simply completes, truthfully, as after a slow
 *     backend;
 *   - if the timeout layer above already gave up on it (the caller was told
 *     ETIMEDOUT), it is a late-landing operation — what a real hung file
 *     system or paused OSD does when it comes back. timeout.ts fences the
 *     object until such an operation settles, so it cannot overtake anything
 *     newer; a drill must exercise exactly that path.
 * `clear({ release: 'fail' })` rejects them (EIO) instead, and `close()`
 * always does (a closing store must not start writes).
 *
 * Imports only the blocker layer and the PRNG.
 */
import type { Blocker, BlockerCapabilities, ObjectStat } from './blocker.js';
import { BlockerError, type BlockerErrorCode } from './errors.js';
import { mulberry32 } from '../common/prng.js';

/** Operations a rule can name (Blocker method names). */
export const FAULT_OPS = ['read', 'write', 'replace', 'readFull', 'punch', 'remove', 'stat', 'list', 'sync'] as const;
export type FaultOp = (typeof FAULT_OPS)[number];

/** Codes a `fail` rule may inject: every BlockerErrorCode. */
export const FAULT_CODES: readonly BlockerErrorCode[] = ['EIO', 'ENOSPC', 'ETIMEDOUT', 'ENOTSUP', 'EFENCED', 'ENOENT', 'EINVAL'];

/**
 * A rule as given (admin JSON, CLI, tests). Exactly one effect: `fail`,
 * `delayMs` or `hang`.
 */
export interface FaultRuleSpec {
  /** Operations it applies to; absent or empty: all. */
  ops?: FaultOp[];
  /** Only objects whose name starts with this; absent or '': all. */
  prefix?: string;
  /** Probability that a matching call is hit, 0..1; default 1. */
  rate?: number;
  /** Stop injecting after this many hits; absent: no limit. */
  limit?: number;
  /** Seed of this rule's PRNG; default: the controller's seed plus the rule id. */
  seed?: number;
  fail?: BlockerErrorCode;
  delayMs?: number;
  hang?: boolean;
}

/** A rule as stored, with its counters. */
export interface FaultRuleState {
  id: number;
  ops: FaultOp[];
  prefix: string;
  rate: number;
  limit: number | null;
  seed: number;
  effect: { fail: BlockerErrorCode } | { delayMs: number } | { hang: true };
  /** Calls that matched `ops` and `prefix`. */
  matched: number;
  /** Calls the rule hit (failed, delayed or hung). */
  injected: number;
  /** Calls hanging on it now. */
  hanging: number;
}

export interface FaultStats {
  rules: FaultRuleState[];
  /** Hits of every rule so far, including cleared ones. */
  injectedTotal: number;
  /** Calls hanging now. */
  hanging: number;
}

/** A bad rule: the caller's mistake (admin replies ARCH_E_USAGE). */
export class FaultRuleError extends Error {
  readonly code = 'ARCH_E_USAGE';
  override readonly name = 'FaultRuleError';
}

interface Hung {
  release(how: 'run' | 'fail'): void;
}

interface Rule {
  state: FaultRuleState;
  prng: () => number;
  hung: Set<Hung>;
}

/** What the controller decided for one call. */
type Decision = undefined | Promise<void>;

/**
 * The rules and counters shared by the FaultyBlockers of one store.
 */
export class FaultController {
  #rules: Rule[] = [];
  #nextId = 1;
  #injectedTotal = 0;
  readonly #seed: number;

  constructor(options: { seed?: number } = {}) {
    this.#seed = (options.seed ?? 1) >>> 0;
  }

  /** True while any rule is set (the wrapper's fast path checks it). */
  get active(): boolean {
    return this.#rules.length > 0;
  }

  /** Replaces every rule (hung calls of the old ones are released: run). Returns the new ids. */
  setRules(specs: readonly unknown[]): number[] {
    const parsed = specs.map((s, i) => parseFaultRule(s, `rule ${i + 1}`));
    this.clear();
    return parsed.map((spec) => this.#add(spec));
  }

  /** Adds one rule after the others; returns its id. */
  addRule(spec: unknown): number {
    return this.#add(parseFaultRule(spec, 'rule'));
  }

  /**
   * Removes every rule (or those in `ids`) and releases the calls hanging on
   * them: they run for real ('run', the default; see the file comment) or
   * reject EIO ('fail'). Returns how many were released.
   */
  clear(options: { release?: 'run' | 'fail'; ids?: readonly number[] } = {}): number {
    const how = options.release ?? 'run';
    const drop = options.ids === undefined ? this.#rules : this.#rules.filter((r) => options.ids!.includes(r.state.id));
    this.#rules = this.#rules.filter((r) => !drop.includes(r));
    let released = 0;
    for (const r of drop) {
      for (const h of [...r.hung]) { h.release(how); released++; }
      r.hung.clear();
      r.state.hanging = 0;
    }
    return released;
  }

  stats(): FaultStats {
    const rules = this.#rules.map((r) => ({ ...r.state, ops: [...r.state.ops], effect: { ...r.state.effect } }));
    return { rules, injectedTotal: this.#injectedTotal, hanging: rules.reduce((n, r) => n + r.hanging, 0) };
  }

  #add(spec: FaultRuleSpec): number {
    const id = this.#nextId++;
    const seed = (spec.seed ?? this.#seed + id) >>> 0;
    const effect: FaultRuleState['effect'] = spec.fail !== undefined ? { fail: spec.fail }
      : spec.delayMs !== undefined ? { delayMs: spec.delayMs } : { hang: true };
    this.#rules.push({
      state: {
        id, ops: spec.ops && spec.ops.length > 0 ? [...spec.ops] : [...FAULT_OPS], prefix: spec.prefix ?? '',
        rate: spec.rate ?? 1, limit: spec.limit ?? null, seed, effect, matched: 0, injected: 0, hanging: 0,
      },
      prng: mulberry32(seed),
      hung: new Set(),
    });
    return id;
  }

  /**
   * Decides for one call: undefined (no fault: run now), or a promise that
   * resolves when the call may run or rejects with the injected error.
   * `matches(prefix)` says whether the call concerns an object with that prefix.
   */
  decide(op: FaultOp, object: string, matches: (prefix: string) => boolean): Decision {
    for (const r of this.#rules) {
      const s = r.state;
      if (!s.ops.includes(op) || (s.prefix !== '' && !matches(s.prefix))) continue;
      s.matched++;
      if (s.limit !== null && s.injected >= s.limit) continue;
      // Draw only for partial rates, so a rate-1 rule does not move its PRNG.
      if (s.rate < 1 && !(r.prng() < s.rate)) continue;
      s.injected++;
      this.#injectedTotal++;
      const e = s.effect;
      if ('fail' in e) return Promise.reject(new BlockerError(e.fail, op, object, `injected fault (rule ${s.id})`));
      if ('delayMs' in e) return new Promise((resolve) => setTimeout(resolve, e.delayMs));
      return this.#hang(r, op, object);
    }
    return undefined;
  }

  #hang(r: Rule, op: FaultOp, object: string): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const h: Hung = {
        release: (how) => {
          if (how === 'run') resolve();
          else reject(new BlockerError('EIO', op, object, `injected hang (rule ${r.state.id}) released as a failure`));
        },
      };
      r.hung.add(h);
      r.state.hanging++;
    });
  }
}

/**
 * Validates a rule given as JSON (or by a test) and returns it typed; throws
 * FaultRuleError naming `what` and the bad field.
 */
export function parseFaultRule(raw: unknown, what = 'rule'): FaultRuleSpec {
  const bad = (why: string) => new FaultRuleError(`fault ${what}: ${why}`);
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw bad('expected an object');
  const r = raw as Record<string, unknown>;
  const known = new Set(['ops', 'prefix', 'rate', 'limit', 'seed', 'fail', 'delayMs', 'hang']);
  for (const k of Object.keys(r)) if (!known.has(k)) throw bad(`unknown field ${JSON.stringify(k)} (known: ${[...known].join(', ')})`);
  const spec: FaultRuleSpec = {};
  if (r.ops !== undefined) {
    const ops = typeof r.ops === 'string' ? [r.ops] : r.ops;
    if (!Array.isArray(ops) || !ops.every((o) => (FAULT_OPS as readonly unknown[]).includes(o))) {
      throw bad(`ops must be a list of ${FAULT_OPS.join(', ')}`);
    }
    spec.ops = ops as FaultOp[];
  }
  if (r.prefix !== undefined) {
    if (typeof r.prefix !== 'string') throw bad('prefix must be a string');
    spec.prefix = r.prefix;
  }
  if (r.rate !== undefined) {
    if (typeof r.rate !== 'number' || !(r.rate >= 0 && r.rate <= 1)) throw bad('rate must be a number from 0 to 1');
    spec.rate = r.rate;
  }
  for (const k of ['limit', 'seed'] as const) {
    const v = r[k];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw bad(`${k} must be a whole number ≥ 0`);
    spec[k] = v;
  }
  const effects = (['fail', 'delayMs', 'hang'] as const).filter((k) => r[k] !== undefined && r[k] !== false);
  if (effects.length !== 1) throw bad('give exactly one effect: "fail": CODE, "delayMs": N or "hang": true');
  if (r.fail !== undefined) {
    if (!FAULT_CODES.includes(r.fail as BlockerErrorCode)) throw bad(`fail must be one of ${FAULT_CODES.join(', ')}`);
    spec.fail = r.fail as BlockerErrorCode;
  } else if (r.delayMs !== undefined) {
    if (typeof r.delayMs !== 'number' || !Number.isSafeInteger(r.delayMs) || r.delayMs < 0 || r.delayMs > 3_600_000) {
      throw bad('delayMs must be whole milliseconds from 0 to 3600000');
    }
    spec.delayMs = r.delayMs;
  } else if (r.hang !== true) {
    throw bad('hang must be true');
  } else {
    spec.hang = true;
  }
  return spec;
}

/** Wraps `inner` so that `faults` decides the fate of each call. */
export function faultyBlocker(inner: Blocker, faults: FaultController): Blocker {
  return new FaultyBlocker(inner, faults);
}

const startsWith = (name: string) => (prefix: string) => name.startsWith(prefix);

class FaultyBlocker implements Blocker {
  #closing: Promise<void> | undefined;

  constructor(private readonly inner: Blocker, private readonly faults: FaultController) {}

  get kind(): string { return this.inner.kind; }
  get capabilities(): BlockerCapabilities { return this.inner.capabilities; }

  /** Runs `call` after the controller's decision (the fast path when no rule is set). */
  #gate<T>(op: FaultOp, object: string, matches: (prefix: string) => boolean, call: () => Promise<T>): Promise<T> {
    if (this.#closing) return Promise.reject(new BlockerError('EIO', op, object, 'blocker is closed'));
    if (!this.faults.active) return call();
    const d = this.faults.decide(op, object, matches);
    return d === undefined ? call() : d.then(call);
  }

  read(name: string, offset: number, length: number, target: Buffer): Promise<number> {
    return this.#gate('read', name, startsWith(name), () => this.inner.read(name, offset, length, target));
  }

  write(name: string, offset: number, data: Buffer): Promise<void> {
    return this.#gate('write', name, startsWith(name), () => this.inner.write(name, offset, data));
  }

  replace(name: string, data: Buffer): Promise<void> {
    return this.#gate('replace', name, startsWith(name), () => this.inner.replace(name, data));
  }

  readFull(name: string): Promise<Buffer> {
    return this.#gate('readFull', name, startsWith(name), () => this.inner.readFull(name));
  }

  punch(name: string, offset: number, length: number): Promise<void> {
    return this.#gate('punch', name, startsWith(name), () => this.inner.punch(name, offset, length));
  }

  remove(name: string): Promise<void> {
    return this.#gate('remove', name, startsWith(name), () => this.inner.remove(name));
  }

  stat(name: string): Promise<ObjectStat> {
    return this.#gate('stat', name, startsWith(name), () => this.inner.stat(name));
  }

  sync(names?: Iterable<string>): Promise<void> {
    if (!this.faults.active && !this.#closing) return this.inner.sync(names);
    const list = names === undefined ? undefined : [...names];
    const matches = list === undefined ? () => true : (p: string) => list.some((n) => n.startsWith(p));
    return this.#gate('sync', list === undefined ? '' : list.join(','), matches, () => this.inner.sync(list));
  }

  async *list(prefix: string): AsyncIterable<string> {
    await this.#gate('list', prefix, (p) => p.startsWith(prefix) || prefix.startsWith(p), () => Promise.resolve());
    yield* this.inner.list(prefix);
  }

  /**
   * Clears the rules, failing whatever still hangs (a closing store starts no
   * writes), then closes the inner blocker. The controller is shared: closing
   * one blocker of a store clears the rules for all of them, as the store closes.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.faults.clear({ release: 'fail' });
      await this.inner.close();
    })();
    return this.#closing;
  }
}
