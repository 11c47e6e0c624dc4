// The web chat's speed in a full room, in headless Chromium: run by
// `hivegate-bench web N` against a gateway it started (BASE_URL). Fills
// room `perf` with N messages from three senders, opens the page there,
// reads back to the first message a scroll step per frame and down again,
// from script (counting the view's jumps) and then with the mouse wheel,
// then measures 60 live messages from arrival to the screen. Prints one
// line per figure; no check of its own (speed is not a test). SLOWDOWN
// (default 1) slows the page's main thread that many times, as on a phone.
import { launch, scrollFrames, scrollTimeline, timelineEdge, wheelGesture } from "./browser.mjs";

const BASE = process.env.BASE_URL, N = Number(process.env.N || 2000), LIVE = 60, SLOWDOWN = Number(process.env.SLOWDOWN || 1);
const browser = await launch();
const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(p * s.length))] || 0; };
const ms = (x) => x.toFixed(1);

// Three senders on raw sockets in a page of their own, 32 publishes in flight each.
const sender = await (await browser.newContext()).newPage();
await sender.goto(BASE + "/favicon.ico");
await sender.evaluate(async ({ base, n }) => {
  const open = (id) => new Promise((ok, fail) => {
    const ws = new WebSocket(base.replace("http", "ws") + "/ws");
    ws.onopen = () => ws.send(JSON.stringify({ op: "hello", client: "perf/1", client_id: "perf-sender-" + id }));
    ws.onmessage = (e) => { const f = JSON.parse(e.data); if (f.op === "hello_ack") ws.send(JSON.stringify({ op: "join", room: "perf", history: 0, request_id: "j" })); if (f.op === "joined") ok(ws); };
    ws.onerror = fail;
  });
  const socks = await Promise.all([0, 1, 2].map(open));
  window.perfSocks = socks;
  // Runs of 1 to 6 messages from one sender, as people talk.
  let i = 0;
  const inflight = new Map(socks.map((s) => [s, 0]));
  await new Promise((done) => {
    let acked = 0;
    socks.forEach((s) => s.addEventListener("message", (e) => { if (JSON.parse(e.data).op === "ack") { inflight.set(s, inflight.get(s) - 1); acked += 1; if (acked === n) done(); else pump(); } }));
    function pump() {
      while (i < n) {
        const s = socks[Math.floor(i / 4) % 3];
        if (inflight.get(s) >= 32) return;
        inflight.set(s, inflight.get(s) + 1);
        const text = i % 10 === 0 ? `message ${i}: a longer one, to wrap on a phone and show that rows differ in height, with a link https://example.org/${i}` : `message ${i}`;
        s.send(JSON.stringify({ op: "publish", room: "perf", text, request_id: "p" + i }));
        i += 1;
      }
    }
    pump();
  });
}, { base: BASE, n: N });

// The reader: each frame's time, long tasks, and when each live message
// arrives (its frame) and is in the page, laid out.
const reader = await (await browser.newContext({ viewport: { width: 1200, height: 800 } })).newPage();
reader.on("pageerror", (e) => console.log("page error: " + e.message + " " + (e.stack || "").split("\n").slice(0, 4).join(" | ")));
reader.on("console", (m) => { if (m.type() === "error") console.log("console error: " + m.text()); });
await reader.addInitScript(() => {
  window.perf = { frames: [], longs: [], arrived: new Map(), shown: new Map(), next: new Map(), most: 0 };
  new PerformanceObserver((l) => l.getEntries().forEach((e) => window.perf.longs.push(e))).observe({ type: "longtask", buffered: true });
  const Real = window.WebSocket;
  window.WebSocket = class extends Real {
    constructor(...a) {
      super(...a);
      this.addEventListener("message", (e) => { const m = /"text":"(live \d+)"/.exec(e.data); if (m) window.perf.arrived.set(m[1], performance.now()); });
    }
  };
  let last = 0;
  const frame = (t) => { if (last) window.perf.frames.push(t - last); last = t; requestAnimationFrame(frame); };
  requestAnimationFrame(frame);
  addEventListener("DOMContentLoaded", () => new MutationObserver((muts) => {
    const now = performance.now();
    for (const mu of muts) for (const n of mu.addedNodes) {
      const t = n.querySelector && n.querySelector(".text");
      if (t && t.textContent.startsWith("live ") && !window.perf.shown.has(t.textContent)) {
        window.perf.shown.set(t.textContent, now);
        requestAnimationFrame((f) => window.perf.next.set(t.textContent, f));
      }
    }
    window.perf.most = Math.max(window.perf.most, document.getElementsByTagName("*").length);
  }).observe(document.getElementById("rows"), { childList: true }));
});
if (SLOWDOWN > 1) {
  await (await reader.context().newCDPSession(reader)).send("Emulation.setCPUThrottlingRate", { rate: SLOWDOWN });
  console.log(`the page's thread slowed ${SLOWDOWN} times`);
}
await reader.goto(BASE + "/#perf");
await reader.waitForFunction(() => document.querySelectorAll("#rows .row").length >= 50);
// Long tasks are told a little late: those that started before a reset
// (the page's own start, the join) are left out by their start time.
const reset = () => reader.evaluate(() => { window.perf.frames = []; window.perf.longs = []; window.perf.since = performance.now(); });
const longs = () => reader.evaluate(() => window.perf.longs.filter((e) => e.startTime >= window.perf.since).map((e) => e.duration));
const opening = await reader.evaluate(() => new Promise((ok) => setTimeout(() => ok(window.perf.longs.map((e) => Math.round(e.duration))), 500)));

// Read back to the first message, a step per frame, and down again.
await reset();
const jumps = [];
const scroll = async (dir) => {
  const run = await scrollTimeline(reader, { step: dir * 120 });
  jumps.push(...run.jumps);
  return run.left;
};
const t0 = Date.now();
const stuckUp = await scroll(-1);
if (stuckUp) console.log("scrolling up " + stuckUp);
const up = (Date.now() - t0) / 1000;
const t1 = Date.now();
const stuckDown = await scroll(1);
if (stuckDown) console.log("scrolling down " + stuckDown);
const down = (Date.now() - t1) / 1000;
const scrolled = await reader.evaluate(() => ({ frames: window.perf.frames, held: S.rooms.get("perf").list.length }));
scrolled.longs = await longs();

// The same again with the mouse wheel, as people scroll: the browser
// scrolls on its compositor thread, when it can, and the page moves its
// window from scroll events. What the reader sees is each display frame:
// shown on time, dropped (the view stood still for a frame), or shown with
// rows not yet drawn.
const cdp = await reader.context().newCDPSession(reader);
const box = await reader.evaluate(() => { const b = document.getElementById("timeline").getBoundingClientRect(); return { x: b.left + b.width / 2, y: b.top + b.height / 2 }; });
const wheel = async (dir) => {
  const end = Date.now() + 60000;
  for (;;) {
    const where = await timelineEdge(reader, dir);
    if (!where) return;
    if (Date.now() > end) return console.log(`wheel scrolling ${dir < 0 ? "up" : "down"} did not get there: ${where}`);
    // 120 px a frame at 60 frames a second, as above.
    if (!await wheelGesture(cdp, box, -dir * 2400, 7200)) return console.log(`a wheel gesture did not end in 10 s, at ${await timelineEdge(reader, dir)}`);
  }
};
const wheeled = await scrollFrames(browser, reader, async () => { await wheel(-1); await wheel(1); });

// Live messages, one every 100 ms, while the reader follows the room.
await reset();
await reader.evaluate(() => latest());
for (let i = 0; i < LIVE; i++) {
  await sender.evaluate((i) => window.perfSocks[i % 3].send(JSON.stringify({ op: "publish", room: "perf", text: `live ${i}`, request_id: "l" + i })), i);
  await reader.waitForTimeout(100);
}
await reader.waitForFunction((n) => window.perf.next.size >= n, LIVE, { timeout: 20000 });
const live = await reader.evaluate(() => {
  const p = window.perf, laid = [], next = [];
  for (const [k, at] of p.arrived) { if (p.shown.has(k)) laid.push(p.shown.get(k) - at); if (p.next.has(k)) next.push(p.next.get(k) - at); }
  return { laid, next, frames: p.frames, most: p.most, all: document.getElementsByTagName("*").length, rows: document.querySelectorAll("#rows .row").length };
});
live.longs = await longs();

const over = (xs, x) => xs.filter((v) => v > x).length;
console.log(`room: ${N} messages, ${scrolled.held} of them held by the page after reading back to the first; opening the page and the room: long tasks ${JSON.stringify(opening)} ms`);
console.log(`scrolling up through all of them (${ms(up)} s, history fetched as it goes) and down again (${ms(down)} s): ${scrolled.frames.length} frames, ` +
  `p50 ${ms(pct(scrolled.frames, 0.5))} ms, p99 ${ms(pct(scrolled.frames, 0.99))} ms, max ${ms(Math.max(...scrolled.frames))} ms, over 20 ms: ${over(scrolled.frames, 20)}; ` +
  `long tasks: ${scrolled.longs.length}` + (scrolled.longs.length ? `, longest ${ms(Math.max(...scrolled.longs))} ms` : "") +
  `; the view jumped ${jumps.length} times, ${jumps.reduce((a, j) => a + Math.abs(j), 0)} px in all`);
const threads = [...new Set(wheeled.map((f) => f.thread === "SCROLL_COMPOSITOR_THREAD" ? "the compositor thread" : "the page's main thread"))];
console.log(`wheel scrolling up to the first and down again, the page holding them all: ${wheeled.length} display frames while scrolling, ` +
  `${wheeled.filter((f) => !f.shown).length} dropped, ${wheeled.filter((f) => f.shown && f.missing).length} shown with rows not yet drawn; scrolled on ${threads.join(" and ")}`);
console.log(`a live message, arrival to its row laid out: p50 ${ms(pct(live.laid, 0.5))} ms, p99 ${ms(pct(live.laid, 0.99))} ms, max ${ms(Math.max(...live.laid))} ms; ` +
  `to the start of the next frame (after it was painted): p50 ${ms(pct(live.next, 0.5))} ms, max ${ms(Math.max(...live.next))} ms (${live.laid.length} messages)`);
console.log(`while live: long tasks ${live.longs.length}` + (live.longs.length ? `, longest ${ms(Math.max(...live.longs))} ms` : "") + `; frames over 20 ms: ${over(live.frames, 20)} of ${live.frames.length}`);
console.log(`DOM: ${live.rows} rows, ${live.all} elements now; at most ${live.most} elements at any time`);
await browser.close();
