// The web chat in headless Chromium, as people use it. Started by
// tests/web.rs, which owns the gateway: when this script prints "OUTAGE" the
// test kills and restarts the gateway and sends 120 messages, then writes
// "SENT" to our stdin. Exits 0 when every check passed.
import { launch, axeViolations, scrollFrames, scrollTimeline, wheelGesture } from "./browser.mjs";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";

const BASE = process.env.BASE_URL;
const SHOTS = process.env.SHOT_DIR;
mkdirSync(SHOTS, { recursive: true });
const lines = createInterface({ input: process.stdin });
// The test that started us is gone: so are we.
lines.on("close", () => process.exit(2));
// Lines are kept: one may come before it is waited for.
const heard = new Set();
lines.on("line", (l) => heard.add(l.trim()));
const waitLine = (want) => new Promise((ok) => { if (heard.has(want)) ok(); else lines.on("line", (l) => { if (l.trim() === want) ok(); }); });

function check(ok, what) {
  if (!ok) throw new Error("failed: " + what);
  console.log("ok - " + what);
}

const browser = await launch();
const errors = [];
async function open(name, viewport, path) {
  const context = await browser.newContext({ viewport: viewport || { width: 1200, height: 800 } });
  const page = await context.newPage();
  page.sockets = 0;
  page.on("websocket", () => { page.sockets += 1; });
  page.on("console", (m) => { if (m.type() === "error") errors.push(`${name}: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`${name}: ${e.message}`));
  const response = await page.goto(BASE + (path || "/"));
  page.headersSeen = response.headers();
  await page.waitForFunction(() => document.getElementById("conn").textContent.startsWith("connected"));
  page.user = (await page.textContent("#me")).replace("you are ", "");
  return page;
}
const texts = (page) => page.$$eval("#timeline .msg:not(.pending) .text", (ns) => ns.map((n) => n.textContent));
const waitText = (page, text) => page.waitForFunction((t) =>
  [...document.querySelectorAll("#timeline .msg .text")].some((n) => n.textContent === t), text, { timeout: 10000 });
async function say(page, text) {
  await page.click("#text");
  const parts = text.split("\n");
  for (let i = 0; i < parts.length; i++) {
    if (i > 0) await page.keyboard.press("Shift+Enter");
    await page.keyboard.type(parts[i]);
  }
  await page.keyboard.press("Enter");
}

try {
  const a = await open("A");
  const b = await open("B");
  check(a.user !== b.user && a.user.startsWith("guest-"), `two pages, two guests (${a.user}, ${b.user})`);
  const csp = a.headersSeen["content-security-policy"] || "";
  check(csp.includes("script-src 'sha256-") && !csp.includes("unsafe"), "the page has a strict Content-Security-Policy");
  check(a.headersSeen["x-content-type-options"] === "nosniff", "X-Content-Type-Options: nosniff");
  const icon = await a.request.get(BASE + "/favicon.ico");
  check(icon.status() === 200, "/favicon.ico is served");

  // Two pages chat; a new line with Shift+Enter; HTML is text.
  await say(a, "hello from A");
  await waitText(b, "hello from A");
  check(true, "B sees A's message");
  await say(b, "line one\nline two");
  await waitText(a, "line one\nline two");
  check(true, "Shift+Enter makes a new line, shown as one");
  const evil = '<img src=x id=evil><b>bold</b>';
  await say(b, evil);
  await waitText(a, evil);
  check(await a.$("#timeline #evil") === null && await a.$("#timeline b") === null, "HTML in a message is shown as text");
  await say(a, "see https://example.org/page?x=1 now");
  await waitText(b, "see https://example.org/page?x=1 now");
  check(await b.$eval("#timeline a[href='https://example.org/page?x=1']", (n) => n.textContent) === "https://example.org/page?x=1", "links are clickable, as text");

  // Presence: each page lists the other.
  await a.waitForFunction((u) => document.getElementById("members").textContent.includes(u), b.user);
  await b.waitForFunction((u) => document.getElementById("members").textContent.includes(u), a.user);
  check(true, "each page's member list shows the other");

  // Reactions: chips with counts on both pages, the user's own marked.
  await say(b, "react to me");
  await waitText(a, "react to me");
  const lastOfB = `#timeline .msg:has(.text:text-is("react to me"))`;
  await a.click(`${lastOfB} .add`);
  await a.click(`${lastOfB} .picker.open .chip:text("👍")`);
  await b.waitForFunction(() => [...document.querySelectorAll("#timeline .chip")].some((c) => c.textContent === "👍 1"));
  await a.waitForSelector(`${lastOfB} .chip.mine`);
  check(true, "a reaction shows as a chip on both pages, marked as A's own on A");
  await a.click(`${lastOfB} .chip.mine`);
  await b.waitForFunction(() => ![...document.querySelectorAll("#timeline .chip")].some((c) => c.textContent.startsWith("👍 ")));
  check(true, "clicking the chip again takes the reaction back, on both pages");
  // One emoji picker at a time, and Escape closes it.
  await a.click(`${lastOfB} .add`);
  await a.click(`#timeline .msg:has(.text:text-is("hello from A")) .add`);
  check(await a.$$eval(".picker.open", (p) => p.length) === 1, "opening a second emoji picker closes the first");
  await a.keyboard.press("Escape");
  check(await a.$$eval(".picker.open", (p) => p.length) === 0, "Escape closes the emoji picker");
  // A compact timeline: a sender's consecutive messages are grouped under
  // one name and avatar, each sender with a stable colour and initial; the
  // react button shows on hover or focus only.
  await say(a, "second line of A");
  await waitText(b, "second line of A");
  const rows = await b.$$eval("#timeline .msg", (ms) => ms.map((m) => ({
    cont: m.classList.contains("cont"), height: m.getBoundingClientRect().height,
    from: m.querySelector(".from")?.textContent, colour: m.querySelector(".from")?.className, initial: m.querySelector(".av")?.textContent })));
  const grouped = rows.filter((r) => r.cont);
  check(grouped.length > 0 && grouped.every((r) => r.height <= 30 && !r.from), `consecutive messages are grouped, one line each (${grouped.map((r) => Math.round(r.height)).join(", ")} px)`);
  const heads = rows.filter((r) => !r.cont);
  const colours = new Map();
  check(heads.every((r) => /^from c[0-7]$/.test(r.colour) && r.initial && r.initial.length === 1 &&
        (colours.get(r.from) || r.colour) === r.colour && colours.set(r.from, r.colour)),
        `each sender has one colour and an initial (${[...colours].map(([f, c]) => f + ": " + c).join(", ")})`);
  const seenOnA = await a.$eval(`#timeline .msg .from`, (n) => [n.textContent, n.className]);
  check(colours.get(seenOnA[0]) === seenOnA[1], "a sender's colour is the same on every page");
  const opacity = (page, sel) => page.$eval(sel, (n) => getComputedStyle(n).opacity);
  const aRow = `#timeline .msg:has(.text:text-is("hello from A"))`;
  await b.mouse.move(1, 1);
  check(await opacity(b, `${aRow} .add`) === "0", "rows carry no react button until wanted");
  await b.hover(`${aRow} .text`);
  check(await opacity(b, `${aRow} .add`) === "1", "hovering a message shows its react button");
  await b.mouse.move(1, 1);
  await b.focus(`${aRow} .add`);
  check(await opacity(b, `${aRow} .add`) === "1", "so does reaching it with the keyboard");
  const bottom = await b.$eval("#composer", (n) => n.getBoundingClientRect().bottom);
  check(bottom >= 795, `the chat fills the window: the composer sits at its foot (${Math.round(bottom)} of 800 px)`);
  await b.screenshot({ path: SHOTS + "/chat.png" });
  // The composer grows with a long draft.
  await a.click("#text");
  for (let i = 0; i < 5; i++) { await a.keyboard.type("line " + i); await a.keyboard.press("Shift+Enter"); }
  await a.keyboard.type("line 5");
  const grown = await a.$eval("#text", (n) => n.getBoundingClientRect().height);
  check(grown >= 100, `a 6-line draft grows the composer (${Math.round(grown)} px)`);
  await a.fill("#text", "");
  await a.$eval("#text", (n) => n.dispatchEvent(new Event("input")));
  // The Join label has room inside its button.
  const join = await a.$eval("#join button", (b) => ({ fits: b.scrollWidth <= b.clientWidth, pad: parseFloat(getComputedStyle(b).paddingLeft) }));
  check(join.fits && join.pad >= 8, `the Join label has room in its button (padding ${join.pad}px)`);

  // Rooms: join a second room, switch back and forth on the same socket.
  await a.fill("#newroom", "second");
  await a.click("#join button");
  await a.waitForFunction(() => document.getElementById("title").textContent === "#second");
  await say(a, "in the second room");
  await waitText(a, "in the second room");
  await say(b, "while A is away");
  await a.waitForFunction(() => [...document.querySelectorAll("#rooms li")].some((li) => li.textContent.includes("#general") && li.querySelector(".unread")?.textContent === "1"));
  check(true, "a message in another room shows as an unread count");
  await a.click("#rooms .room:text('#general')");
  await a.waitForFunction(() => document.getElementById("title").textContent === "#general");
  check(a.sockets === 1, `switching rooms opens no new socket (${a.sockets} opened)`);

  // The assistant streams from the fake provider; Cancel stops it.
  await a.fill("#prompt", "count for me");
  await a.click("#ask");
  await a.waitForFunction(() => document.querySelector("#convo .turn:last-child .answer").textContent.length > 6);
  await a.click("#cancel");
  await a.waitForFunction(() => document.getElementById("aistatus").textContent === "cancelled");
  const stopped = (await a.textContent("#convo .turn:last-child .answer")).length;
  await a.waitForTimeout(800);
  check((await a.textContent("#convo .turn:last-child .answer")).length === stopped && stopped > 0, `the answer streamed in (${stopped} chars) and stopped at Cancel`);
  check(await a.textContent("#convo .turn:last-child .q") === "count for me" && (await a.textContent("#convo .turn:last-child .who")).startsWith("Assistant"),
        "the question is shown above its labelled answer");
  check(await a.$eval("#prompt", (n) => n.value) === "", "the question box is cleared for the next one");
  const code = await a.evaluate(() => { const d = document.createElement("div"); rich(d, "Try:\n```js\nlet x = 1 < 2;\n```\ndone"); return d.innerHTML; });
  check(code === "Try:\n<pre><code>let x = 1 &lt; 2;\n</code></pre>done", `code in an answer is shown as code (${JSON.stringify(code)})`);
  await a.fill("#prompt", "and again");
  await a.press("#prompt", "Enter");
  await a.waitForFunction(() => document.getElementById("aistatus").textContent.startsWith("answered by"), null, { timeout: 20000 });
  const turns = await a.$$eval("#convo .turn", (ts) => ts.map((t) => [t.querySelector(".q").textContent, t.querySelector(".who").textContent, t.querySelector(".answer").textContent]));
  check(turns.length === 2 && turns[1][0] === "and again" && turns[1][1] === "Assistant · fake (fake-model)" && turns[1][2].startsWith("c0 c1 ") && turns[1][2].trim().endsWith("c59"),
        `Enter asks; the answer is labelled with who gave it (${JSON.stringify(turns[1][1])})`);

  // The operator view, on the operator port: live rates as sparklines,
  // breakers, memory, sync and bus, refreshed every second.
  const ops = await (await browser.newContext({ viewport: { width: 1200, height: 800 } })).newPage();
  ops.on("console", (m) => { if (m.type() === "error" && !m.text().includes("Failed to load resource")) errors.push(`ops: ${m.text()}`); });
  ops.on("pageerror", (e) => errors.push(`ops: ${e.message}`));
  let polls = 0;
  ops.on("request", (r) => { if (r.url().endsWith("/readyz")) polls += 1; });
  const opsHeaders = (await ops.goto(process.env.ADMIN_URL + "/")).headers();
  const opsCsp = opsHeaders["content-security-policy"] || "";
  check(opsCsp.includes("script-src 'sha256-") && opsCsp.includes("connect-src 'self'") && !opsCsp.includes("unsafe"), "the operator view has a strict Content-Security-Policy too");
  await ops.waitForFunction(() => document.getElementById("status").textContent === "ready · online");
  const cardsSeen = await ops.$$eval("main section h2", (hs) => hs.map((h) => h.textContent));
  check(["Messages in", "Messages out", "New connections", "LLM calls", "Refusals", "Connections open", "Memory", "Breakers", "Remote sync", "Cluster bus", "Storage"]
    .every((c) => cardsSeen.includes(c)), `the operator view shows every figure (${cardsSeen.join(", ")})`);
  const line = (card) => ops.$eval(`#card-${card} polyline`, (p) => p.getAttribute("points").split(" ").map((xy) => Number(xy.split(",")[1])));
  const inLine = await line("messages_in"), calls = await line("llm_calls");
  check(inLine.length === 60 && inLine.some((y) => y < 29) && calls.some((y) => y < 29),
        "messages in and LLM calls of the last minute are drawn as sparklines (60 points)");
  check(/fake\s*closed/.test(await ops.textContent("#card-breakers")), "the provider's breaker is shown, closed");
  check(/MiB/.test(await ops.textContent("#card-memory")) && /of/.test(await ops.textContent("#card-open")), "memory and connections are shown against their bounds");
  check(/local only/.test(await ops.textContent("#card-sync")) && /one box/.test(await ops.textContent("#card-cluster")), "sync and bus say they are not configured here");
  const polled = polls;
  for (const end = Date.now() + 5000; polls < polled + 2 && Date.now() < end;) await new Promise((ok) => setTimeout(ok, 50));
  check(polls >= polled + 2, `it refreshes every second (${polls} reads of /readyz)`);
  const stamp = await ops.textContent("#updated");
  check(/^updated \d\d:\d\d:\d\d$/.test(stamp), `it says when, in the chat page's 24-hour format (${stamp})`);
  await say(a, "counted by the operator view");
  await ops.waitForFunction(() => Number(document.querySelector("#card-messages_in .sub").textContent.match(/60 s: ([\d.]+)/)[1]) > 0, null, { timeout: 5000 });
  check(true, "the message rates move with the traffic");
  await ops.screenshot({ path: SHOTS + "/ops.png" });
  {
    const ctx = await browser.newContext({ viewport: { width: 1200, height: 800 }, bypassCSP: true });
    const p = await ctx.newPage();
    await p.goto(process.env.ADMIN_URL + "/");
    await p.waitForSelector("#card-storage");
    const found = await axeViolations(p);
    check(found.length === 0, "axe-core finds no accessibility violation in the operator view" + (found.length ? ": " + found.join("; ") : ""));
    await ctx.close();
  }
  const opsDown = ops.waitForSelector("#down.show", { timeout: 15000 });

  // An outage: the gateway is killed and restarted while another client
  // sends 120 messages; the page shows all of them, in order, and where the
  // outage was.
  const before = (await texts(a)).length;
  const nameBefore = a.user;
  // B sees the outage in a banner with "Reconnect now", its member list dimmed.
  const bannerSeen = b.waitForFunction(() => document.getElementById("banner").classList.contains("show") &&
    document.getElementById("members").classList.contains("stale") && !document.getElementById("reconnect").hidden &&
    document.getElementById("bannertext").textContent, null, { timeout: 10000, polling: 20 }).then((h) => h.jsonValue());
  console.log("OUTAGE");
  await a.waitForFunction(() => /reconnecting in \d+ s/.test(document.getElementById("conn").textContent), null, { timeout: 10000 });
  check(true, "the page says it is reconnecting, and when");
  const bannerText = await bannerSeen;
  await opsDown;
  check(await ops.evaluate(() => document.body.classList.contains("stale")) && /does not answer/.test(await ops.textContent("#down")),
        "the operator view says when the gateway does not answer, and greys the last figures");
  await ops.close();
  check(/^Connection lost; reconnecting in \d+ s\.$/.test(bannerText), `an outage shows a banner with Reconnect now, the member list dimmed ("${bannerText}")`);
  await waitLine("SENT");
  await a.waitForFunction(() => document.getElementById("conn").textContent.startsWith("connected"), null, { timeout: 30000 });
  await a.waitForFunction((n) => document.querySelectorAll("#timeline .msg:not(.pending) .text").length >= n, before + 120, { timeout: 30000 });
  const after = await texts(a);
  const missed = after.filter((t) => /^m\d{3}$/.test(t));
  const expected = Array.from({ length: 120 }, (_, i) => "m" + String(i).padStart(3, "0"));
  await b.waitForFunction(() => !document.getElementById("banner").classList.contains("show") && !document.getElementById("members").classList.contains("stale"), null, { timeout: 30000 });
  check(true, "the banner goes and the member list is bright again once connected");
  check(JSON.stringify(missed) === JSON.stringify(expected), `all 120 messages sent during the outage are shown, in order (${missed.length})`);
  check(await a.$("#timeline .outage") !== null, "the timeline marks where the outage was");
  await a.waitForFunction(() => [...document.querySelectorAll("#rooms li")].some((li) =>
    li.querySelector(".room").textContent === "#second" && li.querySelector(".unread")?.textContent === "3"), null, { timeout: 10000 })
    .catch(() => {});
  const unread = await a.$$eval("#rooms li", (lis) => lis.map((li) => li.textContent).join(" | "));
  check(/#second3/.test(unread.replace(/\s/g, "")), `messages another room got during the outage are counted unread (${unread})`);
  const marker = await a.textContent("#timeline .outage");
  const msgTime = await a.textContent("#timeline .msg time");
  // The same shape: digits as digits, AM and PM alike.
  const shape = new RegExp(msgTime.replace(/\d/g, "\\d").replace(/[AP]M/, "[AP]M"));
  check(!/\d:\d\d:\d\d/.test(marker) && msgTime.length > 0 && shape.test(marker),
        `the outage marker writes times as the messages do ("${marker}", "${msgTime}")`);
  // Backoff: a few attempts while the gateway restarts, no storm.
  check(a.sockets >= 2 && a.sockets <= 4, `a reconnect after the outage, with backoff (${a.sockets} sockets in all)`);
  check((await a.textContent("#me")) === "you are " + nameBefore, "the guest name is the same after the reconnect");
  await a.screenshot({ path: SHOTS + "/desktop.png" });

  // A phone.
  const phone = await open("phone", { width: 390, height: 844 });
  await phone.screenshot({ path: SHOTS + "/phone.png" });
  const box = await phone.$eval("#text", (n) => { const r = n.getBoundingClientRect(); return { bottom: r.bottom, font: parseFloat(getComputedStyle(n).fontSize) }; });
  check(box.bottom <= 844 && box.font >= 16, `on a phone the composer is visible and its font is ${box.font}px`);
  const chrome = await phone.$eval("#timeline", (n) => n.getBoundingClientRect().top);
  check(chrome <= 100, `on a phone ${Math.round(chrome)} px of chrome sit above the timeline`);
  const small = await phone.$$eval("button", (bs) => bs.filter((b) => b.offsetParent && b.getBoundingClientRect().height < 40).length);
  check(small === 0, "tap targets are large enough");
  // The side panel opens over the page and closes again, by its own
  // button and by Escape; the composer is reachable after.
  const reachable = (page, sel) => page.$eval(sel, (n) => {
    const r = n.getBoundingClientRect();
    const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
    return r.width > 0 && (hit === n || n.contains(hit));
  });
  await phone.click("#panel");
  check(await phone.isVisible("#members") && await reachable(phone, "#closeside"), "on a phone the people & assistant panel opens, with a Close button in reach");
  await phone.click("#closeside");
  check(!(await phone.isVisible("#members")) && await reachable(phone, "#text") && await reachable(phone, "#panel"), "Close closes it: the composer and the panel button are in reach again");
  await phone.click("#panel");
  await phone.keyboard.press("Escape");
  check(!(await phone.isVisible("#members")), "Escape closes it too");
  // A long press on a message opens its emoji picker.
  const touch = (type) => phone.$eval("#timeline .msg:not(.pending)", (m, t) => m.dispatchEvent(new PointerEvent(t, { pointerType: "touch", bubbles: true })), type);
  await touch("pointerdown");
  await phone.waitForSelector("#timeline .msg.touch .picker .chip", { timeout: 5000 });
  await touch("pointerup");
  check(await phone.$eval("#timeline .msg.touch .add", (n) => getComputedStyle(n).opacity) === "1", "a long press on a message opens its emoji picker and shows its react button");
  await phone.keyboard.press("Escape");
  check(await phone.$$eval(".picker, .msg.touch", (p) => p.length) === 0, "Escape closes the picker");
  // Joining a room works on a phone (then back to the first room).
  const firstRoom = await phone.textContent("#title");
  check(await reachable(phone, "#newroom"), "on a phone the join field is there");
  await phone.fill("#newroom", "phoneroom");
  await phone.click("#join button");
  await phone.waitForFunction(() => document.getElementById("title").textContent.includes("phoneroom"));
  check(true, "a room joined from a phone becomes the current one");
  const tall = await phone.evaluate(() => ({ timeline: $("timeline").offsetHeight, composer: $("composer").offsetHeight }));
  check(tall.composer < 100 && tall.timeline > 500, `on a phone, an empty room's timeline takes the height, not its composer (${tall.timeline} and ${tall.composer} px)`);
  const strip = await phone.evaluate(() => { const s = $("rooms").getBoundingClientRect(), b = document.querySelector("#rooms .room.current").getBoundingClientRect(); return [b.left - s.left, s.right - b.right].map(Math.round); });
  check(strip[0] >= 0 && strip[1] >= 0, `on a phone the room just joined is in view in the strip of rooms (${strip} px inside its left and right)`);
  await phone.screenshot({ path: SHOTS + "/phone-joined.png" });
  await phone.click(`#rooms .room:text-is("${firstRoom}")`);
  await phone.waitForFunction((t) => document.getElementById("title").textContent === t, firstRoom);

  // Reading older messages: they load on scroll up, and a new message
  // does not pull the reader down but shows a marker.
  // The join's history arrives after the connection: wait for it.
  await phone.waitForFunction(() => document.querySelectorAll("#timeline .msg:not(.pending) .text").length >= 50, null, { timeout: 10000 }).catch(() => {});
  const shown = (await texts(phone)).length;
  check(shown === 50, `a join shows the newest 50 (${shown})`);
  await phone.$eval("#timeline", (t) => { t.scrollTop = 0; });
  await phone.waitForFunction((n) => document.querySelectorAll("#timeline .msg .text").length > n, shown, { timeout: 10000 });
  check(true, "scrolling up loads older messages");
  await phone.$eval("#timeline", (t) => { t.scrollTop = 0; });
  await say(b, "while you read");
  await phone.waitForSelector("#newer.show");
  const below = await phone.$eval("#timeline", (t) => t.scrollHeight - t.scrollTop - t.clientHeight);
  check(below > 200, `a new message shows a marker instead of a jump (${below} px still below)`);

  // A room of 600 messages: the page holds a window of it, wherever the
  // reader is, in order; the DOM stays the same size.
  const big = await open("big", { width: 1200, height: 800 }, "/#big");
  await big.waitForFunction(() => document.getElementById("title").textContent === "#big");
  await waitText(big, "b599");
  const view = () => big.evaluate(() => {
    const ts = [...document.querySelectorAll("#rows .row .text")].map((n) => n.textContent);
    return { rows: document.querySelectorAll("#rows .row").length, all: document.getElementsByTagName("*").length, ts };
  });
  // b000 .. b599, some with more lines after the number.
  const num = (t) => parseInt(t.slice(1), 10);
  let most = { rows: 0, all: 0 }, v = await view(), inOrder = true;
  const note = (w) => {
    most = { rows: Math.max(most.rows, w.rows), all: Math.max(most.all, w.all) };
    inOrder = inOrder && w.ts.every((t, i) => i === 0 || num(t) === num(w.ts[i - 1]) + 1);
  };
  note(v);
  while (num(v.ts[0]) !== 0) {
    await big.$eval("#timeline", (t) => { t.scrollTop = 0; });
    await big.waitForFunction((first) => document.querySelector("#rows .row .text").textContent !== first, v.ts[0], { timeout: 10000 });
    v = await view(); note(v);
  }
  check(num(v.ts[v.ts.length - 1]) !== 599, `read back to the first of 600 messages (b${num(v.ts[0])}..b${num(v.ts[v.ts.length - 1])} in the DOM)`);
  while (num(v.ts[v.ts.length - 1]) !== 599) {
    await big.$eval("#timeline", (t) => { t.scrollTop = t.scrollHeight; });
    await big.waitForFunction((last) => [...document.querySelectorAll("#rows .row .text")].pop().textContent !== last, v.ts[v.ts.length - 1], { timeout: 10000 });
    v = await view(); note(v);
  }
  check(inOrder && most.rows <= 150 && most.all <= 1500, `and down to the last: at most ${most.rows} rows, ${most.all} elements in the page at any time, always in order`);
  // Reading back from the newest, 40 px a frame, the message in the middle
  // of the view moves by exactly 40 px each frame: rows that come into the
  // window above, or into view at their real height, move nothing. Nor do
  // they move it within the timeline's content (what the browser drew
  // stays valid: only the rows that came are drawn).
  await big.evaluate(() => latest());
  const { jumps, shifts } = await scrollTimeline(big, { step: -40, frames: 150 });
  check(jumps.length === 0, `reading back, the view moves only as scrolled (${jumps.length} jumps: ${jumps.slice(0, 5)})`);
  check(shifts.length === 0, `reading back, rows coming above move none already laid out (${shifts.length} shifts: ${shifts.slice(0, 5)})`);
  // Up in the room, a click on the room's own name goes to its newest message.
  const lastShown = async () => (await view()).ts.at(-1);
  const upThere = await lastShown();
  await big.click("#rooms button.room.current");
  await big.waitForFunction(() => { const t = document.getElementById("timeline"), all = document.querySelectorAll("#rows .row .text"); return all[all.length - 1].textContent === "b599" && t.scrollHeight - t.scrollTop - t.clientHeight < 2; }, null, { timeout: 10000 }).catch(() => {});
  const back = await lastShown();
  check(upThere !== "b599" && back === "b599", `up in a room, a click on its name goes to its newest message (window ended at ${upThere}, then at ${back})`);
  // Reading the whole room from a fresh page, 120 px a frame, up as older
  // messages load and down again: nothing moves the view either. (Where
  // a message's look waits for the one before it, where the hint above the
  // first message goes, where rows that leave above shrink the content
  // under a view near its bottom, it would.)
  const fresh = await open("big again", { width: 1200, height: 800 }, "/#big");
  await waitText(fresh, "b599");
  const upAll = await scrollTimeline(fresh, { step: -120 }), downAll = await scrollTimeline(fresh, { step: 120 });
  const moves = [...upAll.jumps, ...downAll.jumps];
  check(!upAll.left && !downAll.left && moves.length === 0, `reading the whole room up and down, the view moves only as scrolled (${moves.length} jumps: ${moves.slice(0, 5)}${upAll.left || downAll.left ? "; " + upAll.left + downAll.left : ""})`);
  await fresh.close();
  // The wheel scrolls the timeline on the browser's compositor thread, on a
  // screen of scale 1 too: the view keeps moving while the page works.
  const wheelAt = await big.$eval("#timeline", (t) => { const b = t.getBoundingClientRect(); return { x: b.left + b.width / 2, y: b.top + b.height / 2 }; });
  const cdp = await big.context().newCDPSession(big);
  let ended = false;
  const wheeled = await scrollFrames(browser, big, async () => {
    ended = await wheelGesture(cdp, wheelAt, 1000, 3000);
    await big.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
  });
  const threads = [...new Set(wheeled.map((f) => f.thread))];
  check(ended && wheeled.length > 0 && threads.join() === "SCROLL_COMPOSITOR_THREAD", `the wheel scrolls the timeline on the compositor thread (${wheeled.length} frames: ${threads}${ended ? "" : "; the gesture did not end"})`);
  await say(big, "live in a big room");
  await waitText(big, "live in a big room");
  v = await view();
  check(v.rows <= 150 && await big.$eval("#timeline", (t) => t.scrollHeight - t.scrollTop - t.clientHeight < 40), `a new message joins the window at the bottom, the oldest row leaves it (${v.rows} rows)`);
  await big.close();

  // Token mode: the page asks, explains a wrong token, and signs in.
  if (process.env.TOKEN_URL) {
    const t = await (await browser.newContext()).newPage();
    t.sockets = 0;
    t.on("websocket", () => { t.sockets += 1; });
    t.on("console", (m) => { if (m.type() === "error" && !m.text().includes("WebSocket")) errors.push("token: " + m.text()); });
    await t.goto(process.env.TOKEN_URL + "/");
    await t.waitForSelector("#login.open");
    check((await t.textContent("#loginwhy")).includes("needs an access token"), "a token server asks for a token");
    const card = await t.evaluate(() => {
      const box = document.getElementById("login").getBoundingClientRect();
      const tick = document.getElementById("remember").getBoundingClientRect();
      const label = document.querySelector("#login label").getBoundingClientRect();
      return { height: box.height, focus: document.activeElement && document.activeElement.id,
               tick: tick.top + tick.height / 2, label: label.top + label.height / 2 };
    });
    check(card.height < 300 && card.focus === "token" && !(await t.isVisible("#text")) && !(await t.isVisible("#ask")),
          `the sign-in card is compact (${Math.round(card.height)} px), has the focus, and the chat behind it is not usable`);
    check(Math.abs(card.tick - card.label) <= 3, "the remember checkbox is in line with its label");
    await t.fill("#token", "wrong-token");
    await t.click("#login button");
    await t.waitForFunction(() => document.getElementById("loginwhy").textContent.includes("not accepted"));
    check(true, "a wrong token is explained");
    await t.fill("#token", process.env.TOKEN);
    await t.click("#login button");
    await t.waitForFunction(() => document.getElementById("me").textContent === "you are alice");
    check(await t.evaluate(() => sessionStorage.getItem("hivegate.token") !== null && localStorage.getItem("hivegate.token") === null),
      "signed in as alice; the token is kept for the session only");
    // Errors in words, next to what failed: this server has rate limits
    // and no assistant.
    await t.waitForFunction(() => document.getElementById("title").textContent === "#general");
    await t.fill("#prompt", "hello?");
    await t.click("#ask");
    await t.waitForFunction(() => document.getElementById("aistatus").textContent.startsWith("No assistant is available"));
    check(true, "the assistant's PROVIDER_UNAVAILABLE is said in words");
    await t.evaluate(() => {
      for (let i = 0; i < 80; i++) {
        document.getElementById("text").value = "flood " + i;
        document.getElementById("composer").requestSubmit();
      }
    });
    await t.waitForSelector(".state.failed button:text('Retry')");
    const why = await t.textContent(".state.failed");
    check(/(Too many messages at once|The server is busy)\. Try again in \d+ s\./.test(why), `a refused message says why and offers Retry: "${why.replace("Retry", "").trim()}"`);

    // The connection in words: fallback mode (its remote is down), then
    // shutting down.
    await t.waitForFunction(() => document.getElementById("conn").textContent.includes("fallback mode"), null, { timeout: 20000 });
    check(true, "fallback mode is shown, from /readyz");
    console.log("DRAIN");
    await t.waitForFunction(() => document.getElementById("conn").textContent.includes("shutting down"), null, { timeout: 10000 });
    check(true, "a draining server is said to be shutting down");
    // The server is gone: "Reconnect now" tries at once, not at the next
    // retry (three seconds or more away).
    await t.waitForFunction(() => document.getElementById("banner").classList.contains("show") &&
      /reconnecting in ([3-9]|\d\d+) s/.test(document.getElementById("bannertext").textContent), null, { timeout: 60000 });
    const tries = t.sockets;
    await t.click("#reconnect");
    for (const end = Date.now() + 1500; t.sockets === tries && Date.now() < end;) await new Promise((ok) => setTimeout(ok, 20));
    check(t.sockets === tries + 1, "Reconnect now tries again at once");
  }

  // Accessibility: axe-core finds no violation at all, on a desktop and a
  // phone. (Its script is injected, so this context lets it past the
  // page's policy; every other page above ran under it.)
  for (const [name, viewport] of [["desktop", { width: 1200, height: 800 }], ["phone", { width: 390, height: 844 }]]) {
    const ctx = await browser.newContext({ viewport, bypassCSP: true });
    const p = await ctx.newPage();
    await p.goto(BASE + "/");
    await p.waitForFunction(() => document.getElementById("conn").textContent.startsWith("connected"));
    await p.waitForSelector("#timeline .msg .add");
    const found = await axeViolations(p);
    check(found.length === 0, `axe-core finds no accessibility violation (${name})` + (found.length ? ": " + found.join("; ") : ""));
    const names = await p.$$eval("#timeline .msg .add", (bs) => bs.map((b) => b.getAttribute("aria-label")));
    check(names.length > 1 && new Set(names).size === names.length && names.every((n) => n.startsWith("React to ")),
          `each react button is named for its message ("${names[0]}")`);
    await ctx.close();
  }

  check(errors.length === 0, "no console errors under the policy" + (errors.length ? ": " + errors.join("; ") : ""));
  await browser.close();
  console.log("DONE");
  process.exit(0);
} catch (e) {
  console.log("not ok - " + e.message);
  if (errors.length) console.log("console errors: " + errors.join("; "));
  await browser.close();
  process.exit(1);
}
