"""`make bench`: load (or reuse) a seeded dataset on PostgreSQL, run the service as a separate
process behind Envoy, measure, print a table and write bench/results.json.

Phases, in order (one server process and one Envoy for all of them):
1. trivial RPCs (GetContact over gRPC and REST): the per-request cost of the stack;
2. scenarios: each condition becomes a segment (creation timed), the database settles
   (see settle()), then, side by side in interleaved runs: the compiled count, the
   hand-written SQL count (same answer asserted), GetSegment over gRPC and REST, the
   first page and page 100 of contacts;
3. the scale curve: the same segments in the smaller projects, the database settles, then
   the compiled and hand counts at 100k / 300k / 1M contacts side by side;
4. ListSegments with 50 segments in the project;
5. ExportSegmentContacts of a segment holding every contact;
6. GET /segments/{id}/export of that segment through Envoy (CSV), with the server's RSS
   along the way;
7. the cost of one sweep of time-dependent segments (informational);
8. ingestion with every segment present (informational);
9. the main project's segments are deleted;
10. ingestion: five tracked segments, IngestEvents in batches of 1,000 from several
   clients (throughput), then a paced 1,000 events/s stream whose entry events are timed
    through WatchSegmentEvents (tracking latency); then the throughput again with the
    extended language's scenarios tracked as well, and once more without them;
11. noisy neighbour: a small project's REST latency while the main project holds many
   streams, then runs heavy counts; the main project's upserts during a build of every
   contact (bench/noisy.py);
12. webhooks: a server and database of their own (bench/webhooks.py): a 2,000-event backlog
   drained to a local receiver (events/s), then 1,000 membership changes/s for 10 s
   (entry -> delivery p95);
13. metrics: a `segments run` stack of its own on the same database (two replicas and
   Envoy), 50 segments and some traffic, then the median of 60 scrapes of /metrics.
`--phases` runs a subset (e.g. `--phases noisy`), `--scenarios` some scenarios (e.g.
`--scenarios extended`, the filter language beyond the reference's); their results go to a file of their own.
The server's RSS is sampled every 50 ms throughout.
The exit status is 1 when a target of the phases that ran is missed, at whatever
`--contacts`, or when a phase failed or left its target unmeasured; `--no-enforce` (the
smoke run of the test suite, at a size where timing ratios are noise) lists the misses
without failing on them.
"""
