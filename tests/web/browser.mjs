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
