// What the browser scripts share: Chromium started the same way (headless,
// software rendering, nothing fetched from outside), and axe-core's verdict
// on a page.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

// Every accessibility violation axe-core finds in the page, one line each.
// (Its script is injected: the page's context must bypass the page's CSP.)
export async function axeViolations(page) {
  await page.addScriptTag({ path: new URL("./node_modules/axe-core/axe.min.js", import.meta.url).pathname });
  return page.evaluate(async () => (await window.axe.run(document)).violations
    .map((v) => `${v.impact} ${v.id}: ${v.nodes.length} (${v.nodes[0].target.join(" ")})`));
}

// The display frames of `page` while `during()` scrolls it, from Chromium's
// frame reporter in a trace: for each frame that moved a scroller, whether
// it was shown or dropped (the view stood still for a frame), shown with
// content not yet drawn, and which thread moved the view. (A frame has a
// reporter per pipeline, and forked ones while the page's own frame is in
// flight: they are one frame here.)
export async function scrollFrames(browser, page, during) {
  await browser.startTracing(page, { categories: ["disabled-by-default-devtools.timeline.frame"] });
  await during();
  const trace = JSON.parse(await browser.stopTracing());
  const frames = new Map();
  for (const e of trace.traceEvents || trace) {
    const f = e.name === "PipelineReporter" && e.ph === "b" && e.args && e.args.frame_reporter;
    if (!f || !f.scroll_state || f.scroll_state === "SCROLL_NONE") continue;
    const key = `${e.pid} ${f.layer_tree_host_id} ${f.frame_source} ${f.frame_sequence}`;
    const seen = frames.get(key) || { shown: false, dropped: false, missing: false, thread: f.scroll_state };
    if (f.state === "STATE_PRESENTED_ALL" || f.state === "STATE_PRESENTED_PARTIAL") seen.shown = true;
    if (f.state === "STATE_DROPPED") seen.dropped = true;
    if (f.checkerboarded_needs_raster || f.checkerboarded_needs_record || f.has_missing_content) seen.missing = true;
    frames.set(key, seen);
  }
  return [...frames.values()].filter((f) => f.shown || f.dropped);
}

// A mouse-wheel scroll as the browser's input pipeline sees one (CDP
// session `cdp` of the page); false if it did not end within 10 s.
export function wheelGesture(cdp, at, pixels, speed) {
  const gesture = cdp.send("Input.synthesizeScrollGesture", { x: Math.round(at.x), y: Math.round(at.y), yDistance: pixels, speed, gestureSourceType: "mouse", preventFling: true });
  return Promise.race([gesture.then(() => true), new Promise((ok) => setTimeout(() => ok(false), 10000))]);
}

// Where the chat page's view is in its current room: "" at the room's
// first message (dir < 0) or its last, else the rows and the window the
// page holds. (Runs in the page.)
function edge(dir) {
  const tl = document.getElementById("timeline"), rows = document.getElementById("rows"), r = S.rooms.get(S.current);
  const first = Number(rows.firstElementChild.dataset.seq), last = Number(rows.lastElementChild.dataset.seq);
  const there = dir < 0 ? !r.more && first === r.list[0].seq && tl.scrollTop === 0
    : last === r.lastSeq && tl.scrollHeight - tl.scrollTop - tl.clientHeight < 2;
  return there ? "" : `rows ${first}..${last}, window ${V.lo}..${V.hi}`;
}
export const timelineEdge = (page, dir) => page.evaluate(edge, dir);

// Scrolls the chat page's timeline from script, `step` px a frame (up if
// negative), to the room's first or last message or for `frames` frames;
// 60 s at most. Returns where it stopped (`left`: "" if at the end) and what
// the reader saw move that was not scrolled:
// - jumps: the row in the middle of the view moved by other than the step
//   (what came, went or grew above it moved it), px each;
// - shifts: that row moved within the timeline's content (laid out again
//   somewhere else, so drawn again), px each.
export async function scrollTimeline(page, { step, frames = Infinity }) {
  await page.evaluate(`window.timelineEdge = ${edge}`);
  return page.evaluate(({ step, frames }) => new Promise((done) => {
    const tl = document.getElementById("timeline"), box = tl.getBoundingClientRect(), end = Date.now() + 60000;
    const jumps = [], shifts = [];
    let ref = null, top = 0, at = 0, moved = 0, n = 0;
    const next = () => {
      if (ref && ref.isConnected) {
        const now = ref.getBoundingClientRect().top;
        if (Math.abs(now - top - moved) > 1) jumps.push(Math.round(now - top - moved));
        if (Math.abs(now + tl.scrollTop - at) > 1) shifts.push(Math.round(now + tl.scrollTop - at));
      }
      const left = window.timelineEdge(Math.sign(step));
      if (!left || n++ >= frames) return done({ left, jumps, shifts });
      if (Date.now() > end) return done({ left: "did not get there: " + left, jumps, shifts });
      const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
      ref = hit && hit.closest(".row"); top = ref ? ref.getBoundingClientRect().top : 0; at = top + tl.scrollTop;
      const was = tl.scrollTop;
      tl.scrollTop += step;
      moved = was - tl.scrollTop;
      requestAnimationFrame(next);
    };
    requestAnimationFrame(next);
  }), { step, frames });
}
