/**
 * A histogram for the request path: observing is a bucket search and two
 * additions into typed arrays, with no label hashing and no allocation.
 * prom-client's own Histogram builds a label hash string (and a closure)
 * on every observe(), which costs more than the rest of a 4 KiB NBD request's
 * bookkeeping; this one pays for labels only at scrape time.
 *
 * Series are fixed label sets, added once (addSeries) and then addressed by
 * index. A series appears in the output once it has an observation, like
 * prom-client's lazily created children. The object registers in a
 * prom-client Registry as a metric: the Registry formats what get() returns
 * exactly as for its own histograms (name_bucket{le} cumulative, +Inf,
 * name_sum, name_count).
 */
import type { Metric, Registry } from 'prom-client';

export type Labels = Readonly<Record<string, string>>;

interface Value {
  value: number;
  labels: Record<string, string>;
  metricName: string;
}

export class BucketHistogram {
  readonly type = 'histogram';
  readonly aggregator = 'sum';
  private readonly bounds: Float64Array;
  /** Slots per series: one per bound, then one for values above the largest (+Inf). */
  private readonly width: number;
  /** Per series, per slot: observations that fell in that slot (not cumulative). */
  private counts = new Float64Array(0);
  private sums = new Float64Array(0);
  private readonly series: Labels[] = [];
  private readonly le: string[];

  /** `buckets`: upper bounds, ascending (Prometheus `le`: a value equal to a bound counts in it). */
  constructor(readonly name: string, readonly help: string, buckets: readonly number[]) {
    for (let i = 1; i < buckets.length; i++) {
      if (!(buckets[i]! > buckets[i - 1]!)) throw new Error(`${name}: buckets must ascend`);
    }
    this.bounds = Float64Array.from(buckets);
    this.width = buckets.length + 1;
    this.le = buckets.map(String);
  }

  /** Registers in `registry` (prom-client accepts any object shaped like its metrics). */
  register(registry: Registry): this {
    registry.registerMetric(this as unknown as Metric);
    return this;
  }

  /** Adds a series with these labels; returns its index for observe(). */
  addSeries(labels: Labels): number {
    if ('le' in labels) throw new Error(`${this.name}: le is a reserved label`);
    const index = this.series.length;
    this.series.push(labels);
    const counts = new Float64Array(this.series.length * this.width);
    counts.set(this.counts);
    this.counts = counts;
    const sums = new Float64Array(this.series.length);
    sums.set(this.sums);
    this.sums = sums;
    return index;
  }

  /** Records `value` (seconds, bytes, ...) in series `series`. */
  observe(series: number, value: number): void {
    const bounds = this.bounds;
    const n = bounds.length;
    let i = 0;
    // Linear: most observations fall in the first few buckets.
    while (i < n && value > bounds[i]!) i++;
    this.counts[series * this.width + i] += 1;
    this.sums[series] += value;
  }

  /** Observations in series `series` so far (tests). */
  count(series: number): number {
    let total = 0;
    for (let i = 0; i < this.width; i++) total += this.counts[series * this.width + i]!;
    return total;
  }

  /** The Registry's view: cumulative buckets, +Inf, sum and count of every observed series. */
  async get(): Promise<{ name: string; help: string; type: string; aggregator: string; values: Value[] }> {
    const values: Value[] = [];
    const bucket = `${this.name}_bucket`;
    for (let s = 0; s < this.series.length; s++) {
      const total = this.count(s);
      if (total === 0) continue;
      const labels = this.series[s]!;
      let acc = 0;
      for (let i = 0; i < this.width - 1; i++) {
        acc += this.counts[s * this.width + i]!;
        values.push({ value: acc, labels: { ...labels, le: this.le[i]! }, metricName: bucket });
      }
      values.push({ value: total, labels: { ...labels, le: '+Inf' }, metricName: bucket });
      values.push({ value: this.sums[s]!, labels: { ...labels }, metricName: `${this.name}_sum` });
      values.push({ value: total, labels: { ...labels }, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  /** Registry.resetMetrics(): forget every observation (the series stay). */
  reset(): void {
    this.counts.fill(0);
    this.sums.fill(0);
  }
}
