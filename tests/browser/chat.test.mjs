// The web client at "/", tested in a real headless browser: Debian's
// chromium driven by playwright-core. Two pages chat with each other and with
// a plain WebSocket client, user text stays text, the page reconnects when
// the server restarts, leaves the room when it is left, and works on a
// phone-sized screen. The last test also takes the README's screenshots
// (target/web-client.png, target/web-client-phone.png).
//
// With HTTPS=1 every test runs over https:// and wss:// instead: the server
// gets a self-signed certificate made here with openssl, as a user makes
// one, and the page, which derives its WebSocket URL from its own address,
// must pick wss:// by itself.
//
// Run with `make browser-test` (builds threadchat, installs playwright-core,
// then runs this file twice: over http://, then with HTTPS=1).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createServer } from "node:net";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BIN = process.env.THREADCHAT_BIN ?? new URL("../../target/debug/threadchat", import.meta.url).pathname;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const PATIENCE = 15_000;

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

async function until(what, check) {
  const deadline = Date.now() + PATIENCE;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
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

const lines = (page) => page.$$eval("#messages li", (items) => items.map((li) => li.textContent));
const members = (page) => page.$$eval("#members li", (items) => items.map((li) => li.textContent));

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

/** A port nobody listens on now. */
function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

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
  if (!(await page.evaluate(() => window.restoredFromCache === true))) {
    // Not kept in the cache by this browser: a fresh page, joined by hand.
    await page.fill("#nickname", "eve");
    await page.fill("#room", "bfcache");
    await page.click("#join");
  }
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
    ["sure, see you there", desk.page],
  ]) {
    await who.fill("#text", text);
    await who.click("#send");
    await until(`both pages show "${text}"`, async () =>
      (await lines(phone.page)).some((l) => l.includes(text)) && (await lines(desk.page)).some((l) => l.includes(text)));
  }
  for (const { page } of [phone, desk]) {
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
    await page.close();
    await wrong.close();
  } finally {
    await stopServer(guarded);
  }
});
