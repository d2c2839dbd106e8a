/**
 * `archipelago faults`: backend fault injection in a running daemon, for
 * tests and drills (docs/reliability.md "Backend faults"). The daemon must
 * run with `serve --fault-injection --admin-socket PATH`; otherwise it refuses.
 *
 *   archipelago faults show
 *   archipelago faults add  --op write --prefix d. --rate 0.1 --fail EIO
 *   archipelago faults add  --op sync --hang --limit 1
 *   archipelago faults set  --rules '[{"ops":["replace"],"prefix":"m.","fail":"EIO"}]'
 *   archipelago faults clear [--release run|fail] [--id N]...
 *
 * `set` replaces every rule (with one built from the flags, or the --rules
 * JSON list); `add` appends one. Each talks to the admin socket with one
 * JSON line (src/daemon/admin.ts) and prints the rules with their counters.
 */
import type { CommandModule } from 'yargs';
import { askDaemon } from '../admin-client.js';
import { FAULT_CODES, FAULT_OPS, type FaultRuleSpec, type FaultRuleState } from '../../blockers/faulty.js';
import { printJson, withJson, type JsonArgs } from '../common.js';

interface FaultsArgs extends JsonArgs {
  action: 'show' | 'set' | 'add' | 'clear';
  'admin-socket'?: string;
  op?: string[];
  prefix?: string;
  rate?: number;
  limit?: number;
  seed?: number;
  fail?: string;
  'delay-ms'?: number;
  hang?: boolean;
  rules?: string;
  release?: 'run' | 'fail';
  id?: number[];
}

const usage = (message: string) => Object.assign(new Error(message), { code: 'ARCH_E_USAGE' });

/** The one rule the flags describe (validated again by the daemon). */
function ruleOfFlags(a: FaultsArgs): FaultRuleSpec {
  const rule: Record<string, unknown> = {};
  if (a.op?.length) rule.ops = a.op;
  if (a.prefix !== undefined) rule.prefix = a.prefix;
  if (a.rate !== undefined) rule.rate = a.rate;
  if (a.limit !== undefined) rule.limit = a.limit;
  if (a.seed !== undefined) rule.seed = a.seed;
  if (a.fail !== undefined) rule.fail = a.fail;
  if (a['delay-ms'] !== undefined) rule.delayMs = a['delay-ms'];
  if (a.hang) rule.hang = true;
  return rule as FaultRuleSpec;
}

function requestOf(a: FaultsArgs): Record<string, unknown> {
  switch (a.action) {
    case 'show':
      return { op: 'faults', action: 'show' };
    case 'clear':
      return { op: 'faults', action: 'clear', release: a.release ?? 'run', ...(a.id?.length ? { ids: a.id } : {}) };
    case 'add':
      return { op: 'faults', action: 'add', rule: ruleOfFlags(a) };
    case 'set': {
      if (a.rules === undefined) return { op: 'faults', action: 'set', rules: [ruleOfFlags(a)] };
      let rules: unknown;
      try {
        rules = JSON.parse(a.rules);
      } catch {
        throw usage('faults set --rules: not JSON');
      }
      return { op: 'faults', action: 'set', rules };
    }
  }
}

function describeRule(r: FaultRuleState): string {
  const e = r.effect;
  const effect = 'fail' in e ? `fail ${e.fail}` : 'delayMs' in e ? `delay ${e.delayMs} ms` : 'hang';
  const ops = r.ops.length === FAULT_OPS.length ? 'all ops' : r.ops.join(',');
  return `rule ${r.id}: ${effect} on ${ops}${r.prefix ? ` of ${r.prefix}*` : ''}, rate ${r.rate}`
    + `${r.limit !== null ? `, limit ${r.limit}` : ''}: matched ${r.matched}, injected ${r.injected}${r.hanging ? `, hanging ${r.hanging}` : ''}`;
}

export const faults: CommandModule<object, FaultsArgs> = {
  command: 'faults <action>',
  describe: 'inject backend faults into a daemon started with --fault-injection (tests and drills)',
  builder: (y) => withJson(y
    .positional('action', { choices: ['show', 'set', 'add', 'clear'] as const, demandOption: true })
    .option('admin-socket', {
      type: 'string', default: process.env.ARCHIPELAGO_ADMIN_SOCKET || undefined,
      describe: 'the daemon\'s admin socket; env ARCHIPELAGO_ADMIN_SOCKET',
    })
    .option('op', { type: 'string', array: true, choices: FAULT_OPS, describe: 'operations the rule applies to (repeat; default all)' })
    .option('prefix', { type: 'string', describe: 'only objects whose name starts with this (d.<volume id>. = one volume\'s data)' })
    .option('rate', { type: 'number', describe: 'probability per matching call, 0..1 (default 1)' })
    .option('limit', { type: 'number', describe: 'stop after this many injections' })
    .option('seed', { type: 'number', describe: 'seed of the rule\'s PRNG' })
    .option('fail', { type: 'string', choices: FAULT_CODES, describe: 'effect: fail with this code' })
    .option('delay-ms', { type: 'number', describe: 'effect: add this latency' })
    .option('hang', { type: 'boolean', describe: 'effect: hang until cleared' })
    .option('rules', { type: 'string', describe: 'set: the rules as a JSON list (docs/reliability.md)' })
    .option('release', { choices: ['run', 'fail'] as const, describe: 'clear: hung calls run for real (default) or fail EIO' })
    .option('id', { type: 'number', array: true, describe: 'clear: only these rules' })) as never,
  handler: async (a) => {
    const socket = a['admin-socket'];
    if (!socket) throw usage('faults: give --admin-socket PATH of the daemon (started with --fault-injection)');
    const request = requestOf(a);
    const reply = await askDaemon(socket, request);
    if (a.json) {
      printJson(reply);
      return;
    }
    const rules = reply.rules as FaultRuleState[];
    const lines = rules.length ? rules.map(describeRule) : ['no fault rules'];
    if (typeof reply.released === 'number' && reply.released > 0) lines.push(`released ${reply.released} hung calls (${a.release ?? 'run'})`);
    const b = reply.backend as { timeoutMs: number; late: number; fencedObjects: number; timedOut: Record<string, number> };
    const timedOut = Object.values(b.timedOut).reduce((x, y) => x + y, 0);
    lines.push(`injected ${String(reply.injectedTotal)} in all; backend timeout ${b.timeoutMs} ms: ${timedOut} timed out, `
      + `${b.late} still running, ${b.fencedObjects} objects fenced`);
    process.stdout.write(lines.join('\n') + '\n');
  },
};
