'use strict';
// The "mesh" service in Node.js 20, standard library only (see ../README.md): one process,
// one event loop; http server, http.Agent keep-alive client; ground truth in JSON lines.

const http = require('http');
const fs = require('fs');
const process = require('process');

const cfg = JSON.parse(process.env.MESH_CONFIG);
const SVC = cfg.service;
const PID = process.pid;
const FIELDS = cfg.mode === 'fields';
const WORK_MS = Number(cfg.work_ms ?? 0);
const THINK_MS = Number(cfg.think_ms ?? 0);
const FLAKY_RATE = Number(cfg.flaky_rate ?? 0);

// ---- Randomness: mulberry32, seeded from the config's seed and the pid, so that two
// processes of one run do not draw the same sleeps but a run is reproducible per pid.
let rngState = ((Number(cfg.seed ?? 0) * 0x9e3779b1) ^ (PID * 0x85ebca6b)) >>> 0;
function rand() { // uniform in [0, 1)
  rngState = (rngState + 0x6d2b79f5) >>> 0;
  let t = rngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}

// Exponential sleep with the given mean (ms). 1 - rand() is in (0, 1]: no log(0).
// Note: Node's timers have 1 ms resolution; setTimeout truncates the delay and raises
// anything below 1 ms to 1 ms (so a 0.5 ms mean think time is, in effect, ~1 ms).
function sleepExp(meanMs) {
  if (!(meanMs > 0)) return Promise.resolve();
  return new Promise((resolve) => setTimeout(resolve, -meanMs * Math.log(1 - rand())));
}
const think = () => sleepExp(THINK_MS);

// ---- Ground truth. Times are process.hrtime.bigint() (CLOCK_MONOTONIC, ns), so every
// record says "clock":"monotonic". Lines are buffered and written with writeSync: when
// the buffer passes ~1 MiB, and at exit (SIGTERM/SIGINT), which must be synchronous.
const now = () => process.hrtime.bigint();
const truthFd = fs.openSync(`${cfg.truth_dir}/${SVC}-${PID}.jsonl`, 'a');
let truthBuf = [];
let truthBytes = 0;
let nextN = 1;
const newId = () => `${PID}-${nextN++}`;

// JSON.stringify rejects BigInt (and Node 20 has no JSON.rawJSON): tag BigInts as strings,
// then unquote them so times are plain JSON integers. No other value can be exactly
// "__BIG<digits>" (ops start with "/", keys with the op).
function toLine(rec) {
  const s = JSON.stringify(rec, (k, v) => (typeof v === 'bigint' ? `__BIG${v}` : v));
  return s.replace(/"__BIG(\d+)"/g, '$1') + '\n';
}
function writeTruth(rec) {
  const line = toLine(rec);
  truthBuf.push(line);
  truthBytes += line.length; // ASCII in practice; an estimate is enough for the threshold
  if (truthBytes >= 1 << 20) flushTruth();
}
function flushTruth() {
  if (truthBuf.length === 0) return;
  fs.writeSync(truthFd, truthBuf.join(''));
  truthBuf = [];
  truthBytes = 0;
}

// ---- Client: one keep-alive pool for all peers (64 sockets per peer address).
const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

// One GET to a peer, as a child of the SERVER record `ctx.rid`. Resolves with the status
// once the whole body is read; rejects on a network error (the record then says ok:false).
function call(ctx, peer, path) {
  const p = cfg.peers[peer];
  const rec = {
    kind: 'CLIENT', service: SVC, pid: PID, id: newId(), parent: ctx.rid, op: path,
    peer_port: p.port, lport: null, key: FIELDS ? `${path}:${ctx.qid}` : null, ok: true,
    clock: 'monotonic', t0: now(), t1: null, t_conn: null,
  };
  return new Promise((resolve, reject) => {
    let settled = false;
    const done = (err, status) => {
      if (settled) return;
      settled = true;
      rec.t1 = now();
      if (err) rec.ok = false;
      writeTruth(rec);
      if (err) reject(err); else resolve(status);
    };
    const target = FIELDS ? `${path}?id=${encodeURIComponent(ctx.qid)}` : path;
    const req = http.get({ host: p.host, port: p.port, path: target, agent }, (res) => {
      res.on('error', (e) => done(e));
      res.on('end', () => done(null, res.statusCode));
      res.resume(); // read (and drop) the whole body; 'end' comes after its last byte
    });
    // 'socket' is when the pool hands a connection over. A reused socket knows its local
    // port already; a new one only once connected.
    req.on('socket', (sock) => {
      rec.t_conn = now();
      if (sock.localPort) rec.lport = sock.localPort;
      else sock.once('connect', () => { rec.lport = sock.localPort; });
    });
    req.on('error', (e) => done(e));
  });
}

// ---- Routes. A handler gets ctx = {rid, qid} (its SERVER record id and the request id)
// and returns the HTTP status to answer. The parent id travels in ctx, not in any
// async-context machinery, so it cannot leak between interleaved requests.
async function leaf() { await sleepExp(WORK_MS); return 200; }

const routes = {
  '/seq': async (ctx) => {
    await think(); await call(ctx, 'b', '/b');
    await think(); await call(ctx, 'c', '/c');
    return 200;
  },
  '/par': async (ctx) => {
    await think();
    await Promise.all([call(ctx, 'b', '/b'), call(ctx, 'c', '/c')]);
    return 200;
  },
  '/deep': async (ctx) => {
    await think();
    if (SVC === 'a') await call(ctx, 'b', '/deep');
    else await call(ctx, 'c', '/c'); // at b (c has no /deep, see below)
    return 200;
  },
  '/var': async (ctx) => {
    const k = 1 + Math.floor(rand() * 4);
    for (let i = 0; i < k; i++) { await think(); await call(ctx, 'b', '/b'); }
    return 200;
  },
  '/retry': async (ctx) => {
    // Up to 3 attempts; a 503 is an answer (ok), just not the one wanted. If all three
    // are 503 the handler still answers 200: it did what it was asked.
    for (let attempt = 0; attempt < 3; attempt++) {
      await think();
      if ((await call(ctx, 'c', '/flaky')) === 200) break;
    }
    return 200;
  },
  '/b': leaf,
  '/c': leaf,
  '/flaky': async () => { await sleepExp(WORK_MS); return rand() < FLAKY_RATE ? 503 : 200; },
};

// ---- Server.
const server = http.createServer((req, res) => {
  const t0 = now();
  const q = req.url.indexOf('?');
  const op = q < 0 ? req.url : req.url.slice(0, q);
  const qid = FIELDS ? (new URLSearchParams(q < 0 ? '' : req.url.slice(q + 1)).get('id') ?? '') : null;
  const rec = {
    kind: 'SERVER', service: SVC, pid: PID, id: newId(), op, port: cfg.port,
    peer_port: req.socket.remotePort, // read now: a closed socket forgets it
    key: FIELDS ? `${op}:${qid}` : null, ok: true, clock: 'monotonic', t0, t1: null,
  };
  // t1 when the handler's work is done, before the response is written (a t1 taken at
  // 'finish' can fall after the caller has read the reply: the truth needs a callee's
  // [t0, t1] inside its caller's call); t_done when it was handed to the OS. A
  // connection that closes first ends the record too, as a failure.
  let recorded = false;
  const record = (ok) => {
    if (recorded) return;
    recorded = true;
    if (rec.t1 === null) rec.t1 = now();
    else rec.t_done = now();
    if (!ok) rec.ok = false;
    writeTruth(rec);
  };
  res.on('finish', () => record(rec.ok));
  res.on('close', () => record(false));

  const handler = routes[op];
  const run = handler && !(op === '/deep' && SVC === 'c')
    ? handler({ rid: rec.id, qid })
    : Promise.resolve(404);
  run.then((status) => {
    if (status === 404) rec.ok = false;
    rec.t1 = now();
    reply(res, status, qid);
  }, () => { // a call failed (network error): so did this handler
    rec.ok = false;
    rec.t1 = now();
    reply(res, 500, qid);
  });
});

function reply(res, status, qid) {
  const body = FIELDS ? JSON.stringify({ id: qid, service: SVC }) : '{"ok":true}';
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

// Node closes idle keep-alive connections after 5 s by default; a peer's pooled socket
// reused just as the server closes it fails the call (ECONNRESET). Keep them longer than
// any idle gap in a run (headersTimeout raised too, so no other server timer is shorter).
server.keepAliveTimeout = 120000;
server.headersTimeout = 121000;
server.listen(cfg.port, '127.0.0.1');

// Exit cleanly with the truth flushed. Requests still in flight have no record yet and
// are dropped, as the Python services' atexit flush does.
function shutdown() { flushTruth(); process.exit(0); }
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
process.on('exit', flushTruth); // any other exit (e.g. a crash while listening)
