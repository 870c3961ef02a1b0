// The web client at "/", tested in a real headless browser: Debian's
// chromium driven by playwright-core. Two pages chat with each other and with
// a plain WebSocket client, user text stays text, the page reconnects when
// the server restarts, leaves the room when it is left, and works on a
// phone-sized screen (that test also takes the README's screenshots,
// target/web-client.png and target/web-client-phone.png). Then what people
// see: a reload rejoins, a shared link asks for a name, addresses are links,
// the message box, colours, day separators, the unread count, names too
// long, the icon, the keyboard, axe-core's audit, and refusals (a name to
// change stops the page; "too many" and a relay that is down are retried).
//
// With HTTPS=1 every test runs over https:// and wss:// instead: the server
// gets a self-signed certificate made here with openssl, as a user makes
// one, and the page, which derives its WebSocket URL from its own address,
// must pick wss:// by itself.
//
// Run with `make browser-test` (builds threadchat, installs playwright-core
// and axe-core, then runs this file twice: over http://, then with HTTPS=1).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";
import { chromium } from "playwright-core";
import { BIN, CHROMIUM, PATIENCE, freePort, lines, until } from "./support.mjs";

// The schemes the page and the clients use, and the flags that make every
// server these tests start speak them.
const HTTPS = process.env.HTTPS === "1";
const HTTP_SCHEME = HTTPS ? "https" : "http";
const WS_SCHEME = HTTPS ? "wss" : "ws";
let certDir;
let tlsFlags = [];
if (HTTPS) {
  certDir = mkdtempSync(join(tmpdir(), "threadchat-browser-"));
  const [cert, key] = [join(certDir, "cert.pem"), join(certDir, "key.pem")];
  const made = spawnSync("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
    "-keyout", key, "-out", cert], { encoding: "utf8" });
  assert.equal(made.status, 0, `openssl made no certificate: ${made.stderr}`);
  tlsFlags = ["--tls-cert", cert, "--tls-key", key];
  // A self-signed certificate is trusted by no one: the browser is told to
  // accept it (`ignoreHTTPSErrors` below), and so is Node's own WebSocket
  // client here (Node reads a CA file only at its start, too early for one
  // made by the test).
  process.env.NODE_TLS_REJECT_UNAUTHORIZED = "0";
}
// Every page opens in a context that accepts the self-signed certificate
// (over http://, the option changes nothing).
const CONTEXT = { ignoreHTTPSErrors: true };

/** Starts threadchat (in-process relay, unless `more` names a Redis) and
 * resolves with its address. */
function startServer(port = 0, more = [], env = process.env) {
  const relay = more.includes("--redis") ? [] : ["--in-process"];
  return new Promise((resolve, reject) => {
    const child = spawn(BIN, ["--host", "127.0.0.1", "--port", String(port), ...relay, ...tlsFlags, ...more], {
      stdio: ["ignore", "ignore", "pipe"],
      env,
    });
    let log = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const match = log.match(/listening on (wss?):\/\/([\d.]+:\d+)\//);
      if (match && match[1] !== WS_SCHEME) reject(new Error(`threadchat serves ${match[1]}://, not ${WS_SCHEME}://`));
      if (match) resolve({ child, addr: match[2] });
    });
    child.on("exit", (code) => reject(new Error(`threadchat exited (${code}):\n${log}`)));
  });
}

function stopServer(server) {
  return new Promise((resolve) => {
    server.child.removeAllListeners("exit");
    server.child.on("exit", resolve);
    server.child.kill("SIGTERM");
  });
}

/** A WebSocket client that collects the frames it receives. */
function wsClient(addr, nickname, room) {
  const ws = new WebSocket(`${WS_SCHEME}://${addr}/chat/${encodeURIComponent(nickname)}?room=${room}`);
  const frames = [];
  ws.onmessage = (event) => frames.push(JSON.parse(event.data));
  const opened = new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  return { ws, frames, opened };
}

let server;
let browser;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  if (server) await stopServer(server);
  if (certDir) rmSync(certDir, { recursive: true, force: true });
});

async function openChat(nickname, room, addr = server.addr) {
  const page = await browser.newPage(CONTEXT);
  await page.goto(`${HTTP_SCHEME}://${addr}/`);
  await page.fill("#nickname", nickname);
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  // The page chose the WebSocket scheme that goes with its own.
  assert.equal(await page.evaluate(() => location.protocol), `${HTTP_SCHEME}:`);
  assert.equal(await page.evaluate(() => new URL(socket.url).protocol), `${WS_SCHEME}:`);
  return page;
}

// The member list's names (one's own is marked " (you)": not part of it).
const members = (page) => page.$$eval("#members li", (items) => items.map((li) => li.textContent.replace(/ \(you\)$/, "")));

test("two pages and a WebSocket client chat; user text stays text", async () => {
  const ann = await openChat("ann", "lobby");
  const ben = await openChat("ben", "lobby");
  const cli = wsClient(server.addr, "cli", "lobby");
  await cli.opened;

  // Who is online, kept up to date by join notices.
  await until("ann sees ben and cli", async () => {
    const list = await members(ann);
    return ["ann", "ben", "cli"].every((name) => list.includes(name));
  });

  // Page to page, and page to plain client.
  await ann.fill("#text", "hello from ann");
  await ann.click("#send");
  await until("ben sees ann's message", async () =>
    (await lines(ben)).some((l) => l.includes("ann") && l.includes("hello from ann")));
  await until("cli gets ann's message", () =>
    cli.frames.some((f) => f.type === "chat" && f.nickname === "ann" && f.message === "hello from ann"));

  // Plain client to pages, with markup that must not become markup.
  const hostile = `<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2"> & <b>bold</b>`;
  cli.ws.send(hostile);
  for (const page of [ann, ben]) {
    await until("the hostile text arrives", async () => (await lines(page)).some((l) => l.includes(hostile)));
    assert.equal(await page.$$eval("#messages img, #messages script, #messages b", (n) => n.length), 0);
    assert.equal(await page.evaluate(() => window.pwned), undefined);
  }

  // Text that looks like JSON arrives as typed.
  await ben.fill("#text", '{"message": "not unwrapped"}');
  await ben.click("#send");
  await until("cli gets ben's JSON-looking text", () =>
    cli.frames.some((f) => f.nickname === "ben" && f.message === '{"message": "not unwrapped"}'));

  // A late joiner gets the history, marked as such.
  const cat = await openChat("cat", "lobby");
  await until("cat sees the history", async () =>
    (await cat.$$eval("#messages li.history", (items) => items.map((li) => li.textContent)))
      .some((l) => l.includes("hello from ann")));

  mkdirSync(new URL("../../target", import.meta.url).pathname, { recursive: true });
  await ann.screenshot({ path: new URL("../../target/browser-chat.png", import.meta.url).pathname });
  cli.ws.close();
  await Promise.all([ann.close(), ben.close(), cat.close()]);
});

test("the page reconnects when the server restarts, and says what it could not recover", async () => {
  const page = await openChat("dee", "restart");
  const cli = wsClient(server.addr, "cli", "restart");
  await cli.opened;
  cli.ws.send("before the restart");
  await until("dee sees it", async () => (await lines(page)).some((l) => l.includes("before the restart")));
  const port = Number(server.addr.split(":")[1]);
  await stopServer(server);
  await page.waitForSelector("#status:not(.online)", { timeout: PATIENCE });
  // The in-process relay's log is gone with the process: a new epoch.
  server = await startServer(port);
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  await until("the page is back in the room", async () => (await members(page)).includes("dee"));
  await until("the page says it could not recover everything", async () =>
    (await page.$$eval("#messages li.gap", (items) => items.length)) === 1);
  // In the server's own words.
  const gap = await page.$eval("#messages li.gap", (li) => li.textContent);
  assert.match(gap, /^⚠ could not recover everything you missed/);
  await page.close();
});

test("a page cut off while others chat shows each message once, in order, when it is back", async () => {
  const page = await openChat("eve", "recover");
  const cli = wsClient(server.addr, "fay", "recover");
  await cli.opened;
  cli.ws.send("one");
  await until("eve sees one", async () => (await lines(page)).some((l) => l.includes("one")));
  await page.fill("#text", "mine before the cut");
  await page.click("#send");
  await until("fay gets eve's message", () => cli.frames.some((f) => f.message === "mine before the cut"));
  // The network drops: the page's socket closes, and the page reconnects
  // by itself after its back-off (half a second at least).
  await page.evaluate(() => socket.close(4000, "cut off"));
  for (const text of ["two", "three", "four"]) cli.ws.send(text);
  await until("eve is back and has four", async () => (await lines(page)).some((l) => l.includes("four")));
  cli.ws.send("five");
  await until("eve has five", async () => (await lines(page)).some((l) => l.includes("five")));
  const chat = (await page.$$eval("#messages li.chat", (items) => items.map((li) => li.textContent)));
  for (const text of ["one", "two", "three", "four", "five", "mine before the cut"]) {
    assert.equal(chat.filter((l) => l.includes(text)).length, 1, `"${text}" once in ${JSON.stringify(chat)}`);
  }
  const order = ["one", "two", "three", "four", "five"].map((t) => chat.findIndex((l) => l.includes(t)));
  assert.deepEqual(order, [...order].sort((a, b) => a - b), `in order: ${JSON.stringify(chat)}`);
  assert.equal(await page.$$eval("#messages li.gap", (items) => items.length), 0);
  cli.ws.close();
  await page.close();
});

test("a forged offset on the room's channel hides nothing on the page", async () => {
  const redisPort = await freePort();
  const redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1",
    "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  const redisCli = (...args) => spawnSync("redis-cli", ["-p", String(redisPort), ...args], { encoding: "utf8" });
  await until("redis answers", () => redisCli("PING").stdout?.trim() === "PONG");
  const relay = await startServer(0, ["--redis", `redis://127.0.0.1:${redisPort}`]);
  try {
    const page = await openChat("gus", "forged", relay.addr);
    const cli = wsClient(relay.addr, "hal", "forged");
    const spy = wsClient(relay.addr, "spy", "forged");
    await Promise.all([cli.opened, spy.opened]);
    cli.ws.send("genuine 1");
    await until("spy has genuine 1", () => spy.frames.some((f) => f.message === "genuine 1"));
    const { epoch } = spy.frames.find((f) => f.message === "genuine 1");
    // Anyone who can PUBLISH can put any place in a payload.
    const forged = JSON.stringify({ nickname: "mallory", message: "far ahead", offset: 2 ** 53 - 2, epoch });
    redisCli("PUBLISH", "threadchat:room:forged", forged);
    for (const text of ["genuine 2", "genuine 3"]) cli.ws.send(text);
    await until("gus has genuine 3", async () => (await lines(page)).some((l) => l.includes("genuine 3")));
    // Cut off and back: the history it gets back is shown too.
    await page.evaluate(() => socket.close(4000, "cut off"));
    await page.waitForSelector("#status:not(.online)", { timeout: PATIENCE });
    await page.waitForSelector("#status.online", { timeout: PATIENCE });
    cli.ws.send("genuine 4");
    await until("gus has genuine 4", async () => (await lines(page)).some((l) => l.includes("genuine 4")));
    const chat = await page.$$eval("#messages li.chat", (items) => items.map((li) => li.textContent));
    for (const text of ["genuine 1", "genuine 2", "genuine 3", "genuine 4", "far ahead"]) {
      assert.equal(chat.filter((l) => l.includes(text)).length, 1, `"${text}" once in ${JSON.stringify(chat)}`);
    }
    cli.ws.close();
    spy.ws.close();
    await page.close();
  } finally {
    await stopServer(relay);
    redis.kill("SIGKILL");
  }
});

test("a page that is left leaves the room; restored from the back/forward cache, it comes back", async () => {
  const watcher = wsClient(server.addr, "watcher", "bfcache");
  await watcher.opened;
  const page = await openChat("eve", "bfcache");
  await until("the watcher sees eve join", () =>
    watcher.frames.some((f) => f.type === "join" && f.nickname === "eve"));
  // Navigate away: the page's socket must close now, not when the cache
  // evicts the page.
  await page.goto("about:blank");
  await until("the watcher sees eve leave", () =>
    watcher.frames.some((f) => f.type === "leave" && f.nickname === "eve"));
  const joins = () => watcher.frames.filter((f) => f.type === "join" && f.nickname === "eve").length;
  await page.goBack();
  // Kept in the cache, the page joins again when it is shown; not kept, it
  // is loaded anew, and rejoins as a reload does: the tab was in the room.
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  await until("the watcher sees eve join again", () => joins() === 2);
  watcher.ws.close();
  await page.close();
});

/** A page of a given size, joined to `room` as `nickname`. */
async function openSized(nickname, room, viewport) {
  const context = await browser.newContext({ ...CONTEXT, viewport });
  const page = await context.newPage();
  await page.goto(`${HTTP_SCHEME}://${server.addr}/`);
  // Before joining, the message box and its button are disabled, and look it.
  assert.equal(await page.$eval("#send", (b) => b.disabled), true);
  assert.ok(Number(await page.$eval("#send", (b) => getComputedStyle(b).opacity)) < 1);
  // The form fits the screen, even while it says what is wrong.
  await page.fill("#nickname", "n".repeat(40));
  await page.click("#join");
  for (const selector of ["#nickname", "#room", "#join", "#join-error"]) {
    assert.ok(await onScreen(page, selector), `${selector} is on screen at ${viewport.width} px`);
  }
  await page.fill("#nickname", nickname);
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  return { page, context };
}

/** True when the element is wholly inside the viewport. */
async function onScreen(page, selector) {
  const box = await page.locator(selector).boundingBox();
  const { width, height } = page.viewportSize();
  return box !== null && box.x >= 0 && box.y >= 0 && box.x + box.width <= width && box.y + box.height <= height;
}

test("on a phone and on a desktop, everything is reachable; one's own messages are marked", async () => {
  const phone = await openSized("mia", "cafe", { width: 390, height: 844 });
  const desk = await openSized("leo", "cafe", { width: 1280, height: 800 });
  for (const [text, who] of [
    ["morning! anyone up for lunch at noon?", desk.page],
    ["yes, the usual place?", phone.page],
    ["sure, see you there.\nthe menu is at https://example.com/menu", desk.page],
  ]) {
    await who.fill("#text", text);
    await who.press("#text", "Enter");
    await until(`both pages show "${text}"`, async () =>
      (await lines(phone.page)).some((l) => l.includes(text)) && (await lines(desk.page)).some((l) => l.includes(text)));
  }
  for (const { page } of [phone, desk]) {
    // Today's messages come under "Today"; every name has its colour; the
    // multi-line message keeps its lines, and its address is a link.
    assert.deepEqual(await page.$$eval("#messages li.day", (items) => items.map((li) => li.textContent)), ["Today"]);
    assert.ok(await page.$$eval("#messages .nick", (nicks) => nicks.every((n) => /^nick c[0-7]$/.test(n.className))));
    assert.equal(await page.$eval("#messages a", (a) => a.href), "https://example.com/menu");
    assert.equal(await page.$eval("#text", (t) => t.tagName), "TEXTAREA");
    for (const selector of ["#text", "#send", "#members"]) {
      assert.ok(await onScreen(page, selector), `${selector} is on screen at ${page.viewportSize().width} px`);
    }
    // No page scrollbar, sideways or down: only the messages scroll.
    const overflow = await page.evaluate(() => ({
      x: document.documentElement.scrollWidth - window.innerWidth,
      y: document.documentElement.scrollHeight - window.innerHeight,
    }));
    assert.deepEqual(overflow, { x: 0, y: 0 });
  }
  // Each page marks its own messages, and only those.
  const mine = (page) => page.$$eval("#messages li.mine", (items) => items.map((li) => li.textContent));
  assert.ok((await mine(phone.page)).every((l) => l.startsWith("mia")));
  assert.equal((await mine(phone.page)).length, 1);
  assert.equal((await mine(desk.page)).length, 2);
  await until("both see each other", async () => (await members(phone.page)).includes("leo"));
  const target = (name) => new URL(`../../target/${name}`, import.meta.url).pathname;
  mkdirSync(new URL("../../target", import.meta.url).pathname, { recursive: true });
  await desk.page.screenshot({ path: target("web-client.png") });
  await phone.page.screenshot({ path: target("web-client-phone.png") });
  await phone.context.close();
  await desk.context.close();
});

test("a server that requires tokens asks for one; a wrong one is shown, not retried", async () => {
  const secret = "0123456789abcdef0123456789abcdef";
  const env = { ...process.env, THREADCHAT_AUTH_SECRET: secret };
  const guarded = await startServer(0, [], env);
  try {
    const token = spawnSync(BIN, ["token", "ann"], { env, encoding: "utf8" }).stdout.trim();
    const page = await browser.newPage(CONTEXT);
    await page.goto(`${HTTP_SCHEME}://${guarded.addr}/`);
    assert.ok(await page.isVisible("#token"), "the token field is shown");
    // The nickname comes from the token.
    await page.fill("#token", token);
    await page.click("#join");
    await page.waitForSelector("#status.online", { timeout: PATIENCE });
    assert.equal(await page.inputValue("#nickname"), "ann");

    const wrong = await browser.newPage(CONTEXT);
    await wrong.goto(`${HTTP_SCHEME}://${guarded.addr}/`);
    await wrong.fill("#nickname", "ben");
    await wrong.fill("#token", "not-a-token");
    await wrong.click("#join");
    await until("the refusal is shown", async () =>
      (await lines(wrong)).some((line) => line.includes("not let in") && line.includes("malformed")));
    assert.ok(await wrong.isVisible("#join-form"), "back at the form, not retrying");
    // The token is the thing to change: its field is marked and focused.
    assert.equal(await wrong.evaluate(() => document.activeElement.id), "token");
    assert.equal(await wrong.getAttribute("#token", "aria-invalid"), "true");
    // A token never goes into the page's address (it is shared).
    assert.ok(!(await page.evaluate(() => location.href)).includes(token));
    await page.close();
    await wrong.close();
  } finally {
    await stopServer(guarded);
  }
});

/** A page in a context of its own (its own storage), at `path`; it counts
 * the WebSockets it opens (`window.sockets`). */
async function openAt(path, options = {}, addr = server.addr) {
  const context = await browser.newContext({ ...CONTEXT, ...options });
  await context.addInitScript(() => {
    const Real = window.WebSocket;
    window.sockets = 0;
    window.WebSocket = class extends Real {
      constructor(...args) {
        super(...args);
        window.sockets += 1;
      }
    };
  });
  const page = await context.newPage();
  await page.goto(`${HTTP_SCHEME}://${addr}${path}`);
  return { page, context };
}

/** Joins from the form, as a person does, and waits to be in. */
async function joinAs(page, nickname, room) {
  await page.fill("#nickname", nickname);
  if (room !== undefined) await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
}

test("a reload rejoins the room under the same name; a tab that left stays left, and says so", async () => {
  const { page, context } = await openAt("/");
  await joinAs(page, "ivy", "reload room");
  // The room is in the address, to share.
  assert.equal(await page.evaluate(() => location.search), "?room=reload%20room");
  await page.fill("#text", "before the reload");
  await page.press("#text", "Enter");

  await page.reload();
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  assert.equal(await page.textContent("#room-title"), "#reload room");
  assert.ok((await members(page)).includes("ivy"));
  await until("the history is back", async () => (await lines(page)).some((l) => l.includes("before the reload")));

  await page.click("#leave");
  assert.ok(await page.isVisible("#join-form"), "the form is back");
  assert.ok((await lines(page)).includes("you left #reload room"));
  assert.ok((await lines(page)).some((l) => l.includes("before the reload")), "the history stays");
  // Left is left, after a reload too: the page does not connect.
  await page.reload();
  assert.equal(await page.evaluate(() => socket === null && wanted === null), true);
  assert.ok(await page.isVisible("#join-form"));
  assert.equal(await page.inputValue("#room"), "reload room");
  await context.close();
});

test("a shared link names the room and asks only for a name; it never joins by itself", async () => {
  const { page, context } = await openAt(`/?room=${encodeURIComponent("tea & cake")}`);
  // Before joining: what to do, no empty member list.
  assert.match(await page.textContent("#empty"), /Pick a name and press Join/);
  assert.equal(await page.isVisible("#people"), false);
  assert.equal(await page.isVisible("#messages"), false);
  assert.equal(await page.inputValue("#room"), "tea & cake");
  assert.equal(await page.textContent("#join"), "Join #tea & cake");
  assert.equal(await page.evaluate(() => document.activeElement.id), "nickname");
  await page.keyboard.type("joy");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  assert.ok(await page.isVisible("#people"), "the member list once in");
  assert.equal(await page.isVisible("#empty"), false);
  assert.deepEqual(await page.$$eval("#members li", (items) => items.map((li) => li.textContent)), ["joy (you)"]);
  assert.equal(await page.title(), "#tea & cake · threadchat");

  // The same person opens a link to another room in a new tab: the name is
  // remembered, but joining still takes their Enter.
  const other = await context.newPage();
  await other.goto(`${HTTP_SCHEME}://${server.addr}/?room=elsewhere`);
  assert.equal(await other.inputValue("#nickname"), "joy");
  assert.equal(await other.evaluate(() => socket === null && wanted === null), true);
  assert.ok(await other.isVisible("#join-form"));
  await other.press("#nickname", "Enter");
  await other.waitForSelector("#status.online", { timeout: PATIENCE });
  assert.equal(await other.textContent("#room-title"), "#elsewhere");
  await context.close();
});

test("addresses in messages are links; nothing else is, and no markup ever", async () => {
  const { page, context } = await openAt("/");
  await joinAs(page, "kim", "links");
  const cli = wsClient(server.addr, "lou", "links");
  await cli.opened;
  const texts = [
    "see https://example.com/a?b=1&c=2.",
    "javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    `<img src=x onerror="window.pwned = 1"> <a href="javascript:alert(1)">click</a>`,
    "(docs at https://example.com/x_(y)) and HTTP://EXAMPLE.NET/up), ok?",
    "last",
  ];
  for (const text of texts) cli.ws.send(text);
  await until("kim has them all", async () => (await lines(page)).some((l) => l.includes("last")));
  const links = await page.$$eval("#messages a", (items) =>
    items.map((a) => ({ href: a.href, text: a.textContent, rel: a.rel, target: a.target })));
  const link = (href, text) => ({ href, text, rel: "noopener noreferrer", target: "_blank" });
  assert.deepEqual(links, [
    link("https://example.com/a?b=1&c=2", "https://example.com/a?b=1&c=2"),
    link("https://example.com/x_(y)", "https://example.com/x_(y)"),
    link("http://example.net/up", "HTTP://EXAMPLE.NET/up"),
  ]);
  // The punctuation after an address stays text, and so does everything else.
  for (const text of texts) assert.ok((await lines(page)).some((l) => l.includes(text)), text);
  assert.equal(await page.$$eval("#messages img, #messages script", (n) => n.length), 0);
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  cli.ws.close();
  await context.close();
});

test("the message box: Enter sends, Shift+Enter is a new line; it grows, then scrolls", async () => {
  const { page, context } = await openAt("/");
  await joinAs(page, "max", "lines");
  const cli = wsClient(server.addr, "ned", "lines");
  await cli.opened;
  const height = () => page.$eval("#text", (t) => t.getBoundingClientRect().height);
  const one = await height();
  await page.focus("#text");
  await page.keyboard.type("first line");
  await page.keyboard.press("Shift+Enter");
  await page.keyboard.type("second line");
  assert.equal(await page.inputValue("#text"), "first line\nsecond line");
  assert.ok((await height()) > one, "two lines make the box taller");
  await page.keyboard.press("Enter");
  await until("ned gets both lines as one message", () =>
    cli.frames.some((f) => f.type === "chat" && f.message === "first line\nsecond line"));
  assert.equal(await page.inputValue("#text"), "");
  assert.ok(Math.abs((await height()) - one) < 1, "back to one line once sent");
  // Its own line keeps the line break.
  assert.ok((await lines(page)).some((l) => l.includes("first line\nsecond line")));
  // Many lines: the box stops growing and scrolls.
  await page.fill("#text", Array.from({ length: 20 }, (_, i) => `line ${i}`).join("\n"));
  const tall = await height();
  assert.ok(tall > one * 3 && tall < one * 7, `about five lines high, not twenty (${one} → ${tall})`);
  assert.ok(await page.$eval("#text", (t) => t.scrollHeight > t.clientHeight), "the rest scrolls");
  cli.ws.close();
  await context.close();
});

/** WCAG's contrast ratio of two computed CSS colours ("rgb(…)"). */
function contrast(a, b) {
  const luminance = (css) => {
    const [r, g, b] = css.match(/\d+(\.\d+)?/g).slice(0, 3).map((v) => {
      const c = Number(v) / 255;
      return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const [hi, lo] = [luminance(a), luminance(b)].sort((x, y) => y - x);
  return (hi + 0.05) / (lo + 0.05);
}

test("each name has its own colour, the same on every page, readable on every background; you are marked", async () => {
  const a = await openAt("/");
  const b = await openAt("/");
  await joinAs(a.page, "olga", "colours");
  await joinAs(b.page, "pete", "colours");
  for (const [who, text] of [[a.page, "hi pete"], [b.page, "hi olga"]]) {
    await who.fill("#text", text);
    await who.press("#text", "Enter");
  }
  await until("each sees the other's", async () =>
    (await lines(a.page)).some((l) => l.includes("hi olga")) && (await lines(b.page)).some((l) => l.includes("hi pete")));
  const colours = (page) => page.$$eval("#messages .nick", (nicks) =>
    Object.fromEntries(nicks.map((n) => [n.textContent, getComputedStyle(n).color])));
  assert.deepEqual(await colours(a.page), await colours(b.page));
  assert.deepEqual(await a.page.$$eval("#members li", (items) => items.map((li) => li.textContent)), ["olga (you)", "pete"]);
  assert.deepEqual(await b.page.$$eval("#members li", (items) => items.map((li) => li.textContent)), ["olga", "pete (you)"]);
  // All eight colours, on the backgrounds names are drawn on: the pane,
  // one's own lines, the member list.
  const pairs = await a.page.evaluate(() => {
    const places = [document.querySelector("#messages li.chat:not(.mine)"), document.querySelector("#messages li.mine"),
      document.querySelector("#members li")];
    const background = (el) => {
      for (; el; el = el.parentElement) {
        const bg = getComputedStyle(el).backgroundColor;
        if (bg !== "rgba(0, 0, 0, 0)") return bg;
      }
      return "rgb(255, 255, 255)";
    };
    return places.flatMap((place) => Array.from({ length: 8 }, (_, i) => {
      const span = document.createElement("span");
      span.className = `c${i}`;
      place.appendChild(span);
      const pair = [getComputedStyle(span).color, background(span)];
      span.remove();
      return pair;
    }));
  });
  assert.equal(new Set(pairs.map(([fg]) => fg)).size, 8, "eight colours");
  for (const [fg, bg] of pairs) assert.ok(contrast(fg, bg) >= 4.5, `${fg} on ${bg}: ${contrast(fg, bg).toFixed(2)}`);
  await a.context.close();
  await b.context.close();
});

test("a day's first message comes under the day's name: Yesterday, Today", async () => {
  const a = await openAt("/");
  await joinAs(a.page, "quin", "days");
  await a.page.fill("#text", "said today, read tomorrow");
  await a.page.press("#text", "Enter");
  // A reader whose clock is a day ahead: today's history is its yesterday,
  // and what it sends itself is its today.
  const context = await browser.newContext(CONTEXT);
  const page = await context.newPage();
  await page.clock.setFixedTime(Date.now() + 24 * 3600 * 1000);
  await page.goto(`${HTTP_SCHEME}://${server.addr}/`);
  await joinAs(page, "rae", "days");
  await until("rae has the history", async () => (await lines(page)).some((l) => l.includes("said today")));
  await page.fill("#text", "said on my today");
  await page.press("#text", "Enter");
  const shown = await page.$$eval("#messages li", (items) => items.map((li) => li.className === "day" ? `[${li.textContent}]` : li.textContent));
  const at = (text) => shown.findIndex((l) => l.includes(text));
  assert.deepEqual(shown.filter((l) => l.startsWith("[")), ["[Yesterday]", "[Today]"], JSON.stringify(shown));
  assert.ok(at("[Yesterday]") < at("said today") && at("said today") < at("[Today]") && at("[Today]") < at("said on my today"),
    JSON.stringify(shown));
  await a.context.close();
  await context.close();
});

test("a hidden tab counts what came in its title, and clears it when seen", async () => {
  const reader = await openAt("/");
  await joinAs(reader.page, "sam", "unread");
  assert.equal(await reader.page.title(), "#unread · threadchat");
  const cli = wsClient(server.addr, "tia", "unread");
  await cli.opened;
  // The tab goes to the background, as far as the page can tell.
  const visibility = (state) => reader.page.evaluate((state) => {
    Object.defineProperty(document, "visibilityState", { configurable: true, get: () => state });
    Object.defineProperty(document, "hidden", { configurable: true, get: () => state === "hidden" });
    document.dispatchEvent(new Event("visibilitychange"));
  }, state);
  await visibility("hidden");
  for (const text of ["one", "two", "three"]) cli.ws.send(text);
  await until("three unread", async () => (await reader.page.title()) === "(3) #unread · threadchat");
  await visibility("visible");
  assert.equal(await reader.page.title(), "#unread · threadchat");
  cli.ws.close();
  await reader.context.close();
});

test("a name or room that is too long is refused with the limit, never cut", async () => {
  const { page, context } = await openAt("/");
  assert.equal(await page.$$eval("input[maxlength]", (n) => n.length), 0);
  const long = "a".repeat(40);
  await page.fill("#nickname", long);
  await page.click("#join");
  assert.equal(await page.textContent("#join-error"), "A name has at most 32 characters; this one has 40.");
  assert.equal(await page.getAttribute("#nickname", "aria-invalid"), "true");
  assert.equal(await page.getAttribute("#nickname", "aria-describedby"), "join-error");
  assert.equal(await page.inputValue("#nickname"), long, "not cut");
  assert.equal(await page.evaluate(() => wanted === null && socket === null), true);

  await page.fill("#nickname", "uma");
  await page.fill("#room", "r".repeat(33));
  await page.click("#join");
  assert.equal(await page.textContent("#join-error"), "A room name has at most 32 characters; this one has 33.");
  assert.equal(await page.getAttribute("#room", "aria-invalid"), "true");
  assert.equal(await page.getAttribute("#nickname", "aria-invalid"), null);
  assert.equal(await page.evaluate(() => document.activeElement.id), "room");

  // Counted as the server counts, by character: 32 of them is fine, even
  // when each takes two UTF-16 units.
  await page.fill("#room", `r${"é".repeat(15)}${"🍵".repeat(16)}`);
  await page.click("#join");
  assert.equal(await page.getAttribute("#room", "aria-invalid"), null);
  assert.equal(await page.isVisible("#join-error"), false);
  assert.equal(await page.evaluate(() => wanted !== null), true);
  await context.close();
});

test("the icon is drawn in the page, and the page's policy lets it show", async () => {
  const { page, context } = await openAt("/");
  const href = await page.getAttribute("link[rel=icon]", "href");
  assert.ok(href.startsWith("data:image/svg+xml,"), href);
  assert.ok(!href.includes("base64") && href.length < 1000);
  // The image loads under the page's own Content-Security-Policy.
  const drawn = await page.evaluate((href) => new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img.naturalWidth > 0);
    img.onerror = () => resolve(false);
    img.src = href;
  }), href);
  assert.equal(drawn, true);
  // And the page itself never names the relay's store.
  const text = await (await fetch(`${HTTP_SCHEME}://${server.addr}/`)).text();
  assert.doesNotMatch(text, /redis/i);
  await context.close();
});

test("the page works from the keyboard alone", async () => {
  const { page, context } = await openAt("/?room=keys");
  const focused = () => page.evaluate(() => document.activeElement.id);
  assert.equal(await focused(), "nickname");
  await page.keyboard.type("val");
  await page.keyboard.press("Tab");
  assert.equal(await focused(), "room");
  await page.keyboard.press("Tab");
  assert.equal(await focused(), "join");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  // In the room, the message box has the focus.
  assert.equal(await focused(), "text");
  await page.keyboard.type("typed, not clicked");
  await page.keyboard.press("Enter");
  assert.ok((await lines(page)).some((l) => l.includes("typed, not clicked")));
  // Escape does not keep the focus; Tab leaves the box (it is not a tab key).
  await page.keyboard.press("Escape");
  await page.keyboard.press("Tab");
  assert.equal(await focused(), "send");
  await page.keyboard.press("Shift+Tab");
  await page.keyboard.press("Shift+Tab");
  assert.equal(await focused(), "messages", "the messages can be scrolled from the keyboard");
  await page.keyboard.press("Shift+Tab");
  assert.equal(await focused(), "leave");
  await page.keyboard.press("Enter");
  assert.ok(await page.isVisible("#join-form"));
  assert.equal(await focused(), "join");
  await context.close();
});

test("no serious accessibility problem (axe): before joining, in a room, on a phone", async () => {
  const axe = createRequire(import.meta.url).resolve("axe-core/axe.min.js");
  // axe is added as an inline script, which the page's policy refuses:
  // this test's pages run without it.
  const audit = async (page, what) => {
    await page.addScriptTag({ path: axe });
    const violations = await page.evaluate(async () =>
      (await window.axe.run()).violations
        .filter((v) => v.impact === "serious" || v.impact === "critical")
        .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`));
    assert.deepEqual(violations, [], what);
  };
  const desk = await openAt("/?room=axe", { bypassCSP: true, viewport: { width: 1280, height: 800 } });
  await audit(desk.page, "before joining");
  await joinAs(desk.page, "wes", "axe");
  const cli = wsClient(server.addr, "xia", "axe");
  await cli.opened;
  for (const text of ["hello, see https://example.com/", "two\nlines"]) cli.ws.send(text);
  await desk.page.fill("#text", "mine");
  await desk.page.press("#text", "Enter");
  await until("the messages are in", async () => (await lines(desk.page)).some((l) => l.includes("two\nlines")));
  await audit(desk.page, "in a room");
  const phone = await openAt("/?room=axe", { bypassCSP: true, viewport: { width: 390, height: 844 } });
  await audit(phone.page, "on a phone, before joining");
  await joinAs(phone.page, "yan", "axe");
  await until("the phone has the history", async () => (await lines(phone.page)).some((l) => l.includes("two\nlines")));
  await audit(phone.page, "on a phone, in a room");
  cli.ws.close();
  await desk.context.close();
  await phone.context.close();
});

test("a refused name brings the form back with the reason and is not tried again; 'too many' is", async () => {
  const unique = await startServer(0, ["--unique-nicknames"]);
  const capped = await startServer(0, ["--unique-nicknames", "--max-nicknames-per-ip", "1"]);
  const opened = [];
  try {
    /** Joins from the form and waits for the refusal, said in the pane. */
    const refusedAt = async (addr, nickname, room, words) => {
      const at = await openAt("/", {}, addr);
      opened.push(at);
      await at.page.fill("#nickname", nickname);
      await at.page.fill("#room", room);
      await at.page.click("#join");
      await until(`the refusal of ${nickname}`, async () =>
        (await lines(at.page)).some((l) => l.startsWith("not let in: ") && words.test(l)));
      return at.page;
    };
    const stopped = async (page, field) => {
      assert.ok(await page.isVisible("#join-form"), "the form is back");
      assert.equal(await page.evaluate(() => document.activeElement.id), field);
      assert.equal(await page.getAttribute(`#${field}`, "aria-invalid"), "true");
      assert.equal(await page.evaluate(() => wanted === null && socket === null), true);
      // Past the first back-off (at most a second): no second try.
      await new Promise((r) => setTimeout(r, 2500));
      assert.equal(await page.evaluate(() => window.sockets), 1, "not tried again");
    };

    // 4400: a name only the server refuses (it keeps "server" for itself).
    await stopped(await refusedAt(server.addr, "server", "refusals", /nickname/), "nickname");

    // 4409: a name taken in the room, as people read it.
    const amy = await openAt("/", {}, unique.addr);
    opened.push(amy);
    await joinAs(amy.page, "amy", "taken");
    await stopped(await refusedAt(unique.addr, "AMY", "taken", /taken/), "nickname");

    // 4429: one name per address on this server: a second waits, retrying,
    // and gets in once the first has left.
    const first = await openAt("/", {}, capped.addr);
    opened.push(first);
    await joinAs(first.page, "cy", "cap");
    const second = await refusedAt(capped.addr, "di", "cap", /holds 1 nicknames/);
    assert.equal(await second.isVisible("#join-form"), false, "still trying");
    // Said once, however often it is tried again.
    await until("two more tries", async () => (await second.evaluate(() => window.sockets)) >= 3);
    assert.equal((await lines(second)).filter((l) => l.startsWith("not let in: ")).length, 1);
    await first.page.click("#leave");
    await second.waitForSelector("#status.online", { timeout: PATIENCE });
    assert.ok((await second.evaluate(() => window.sockets)) > 1);
  } finally {
    for (const { context } of opened) await context.close();
    await stopServer(unique);
    await stopServer(capped);
  }
});

test("a relay that is down: the page says so and tries again until it gets in", async () => {
  const redisPort = await freePort();
  const startRedis = () => spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1",
    "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  const redisUp = () => spawnSync("redis-cli", ["-p", String(redisPort), "PING"], { encoding: "utf8" }).stdout?.trim() === "PONG";
  let redis = startRedis();
  await until("redis answers", redisUp);
  const relay = await startServer(0, ["--redis", `redis://127.0.0.1:${redisPort}`]);
  const at = await openAt("/", {}, relay.addr);
  try {
    redis.kill("SIGKILL");
    await until("redis is gone", () => !redisUp());
    await at.page.fill("#nickname", "rio");
    await at.page.fill("#room", "down");
    await at.page.click("#join");
    // 4503: said, and tried again (the form stays away).
    await until("the refusal is shown", async () =>
      (await lines(at.page)).some((l) => l.startsWith("not let in: ") && l.includes("relay unavailable")));
    assert.equal(await at.page.isVisible("#join-form"), false, "still trying");
    redis = startRedis();
    await until("redis is back", redisUp);
    await at.page.waitForSelector("#status.online", { timeout: 4 * PATIENCE });
    assert.ok((await at.page.evaluate(() => window.sockets)) > 1);
    // In the room: what others say arrives. (Not checked: the member list.
    // For up to a heartbeat after Redis came back empty, the server lists
    // nobody of this instance, the joiner included.)
    const cli = wsClient(relay.addr, "sol", "down");
    await cli.opened;
    cli.ws.send("you are in");
    await until("rio hears sol", async () => (await lines(at.page)).some((l) => l.includes("you are in")));
    cli.ws.close();
  } finally {
    await at.context.close();
    await stopServer(relay);
    redis.kill("SIGKILL");
  }
});
