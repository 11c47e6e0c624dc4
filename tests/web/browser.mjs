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
