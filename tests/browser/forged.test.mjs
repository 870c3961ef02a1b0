// What a hostile sender can make the web page at "/" show: payloads forged
// on a room's Redis channel (anyone who can PUBLISH there can write any
// field the server passes on, `ts` included) and shared links with markup
// in them, and direction marks any client may send. The page must show
// every message as text, make links of http(s) addresses only, keep a
// message's direction in the message, and never stop showing messages.
//
// `make browser-test` runs it (over http:// only); by hand, after
// `cargo build`, with playwright-core installed in tests/browser:
//   CHROMIUM=/usr/bin/chromium node --experimental-websocket --test forged.test.mjs
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { chromium } from "playwright-core";
import { BIN, CHROMIUM, PATIENCE, freePort, lines, until } from "./support.mjs";

let redis;
let redisPort;
let relay;
let browser;
const redisCli = (...args) => spawnSync("redis-cli", ["-p", String(redisPort), ...args], { encoding: "utf8" });

before(async () => {
  redisPort = await freePort();
  redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1",
    "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  await until("redis answers", () => redisCli("PING").stdout?.trim() === "PONG");
  relay = await new Promise((resolve, reject) => {
    const child = spawn(BIN, ["--host", "127.0.0.1", "--port", "0", "--redis", `redis://127.0.0.1:${redisPort}`],
      { stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      log += chunk;
      const match = log.match(/listening on ws:\/\/([\d.]+:\d+)\//);
      if (match) resolve({ child, addr: match[1] });
    });
    child.on("exit", (code) => reject(new Error(`threadchat exited (${code}):\n${log}`)));
  });
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
});

after(async () => {
  await browser?.close();
  if (relay) {
    relay.child.removeAllListeners("exit");
    relay.child.kill("SIGTERM");
  }
  redis?.kill("SIGKILL");
});

/** A page that joined `room` as `nickname`, with the page's errors kept. */
async function openChat(nickname, room) {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  page.on("dialog", (dialog) => { errors.push(`dialog: ${dialog.message()}`); dialog.dismiss(); });
  await page.goto(`http://${relay.addr}/`);
  await page.fill("#nickname", nickname);
  await page.fill("#room", room);
  await page.click("#join");
  await page.waitForSelector("#status.online", { timeout: PATIENCE });
  return { page, errors };
}

test("a forged time no date can hold is no reason to lose the message", async () => {
  const { page, errors } = await openChat("ann", "forged-time");
  // Past ±8.64e15 ms a JavaScript Date is invalid; a u64 goes far beyond.
  for (const [i, ts] of [9e15, 18446744073709551615n].entries()) {
    const forged = `{"nickname":"mallory","message":"forged ${i}","ts":${ts}}`;
    redisCli("PUBLISH", "threadchat:room:forged-time", forged);
  }
  redisCli("PUBLISH", "threadchat:room:forged-time", JSON.stringify({ nickname: "bob", message: "after", ts: Date.now() }));
  await until("ann has the last message", async () => (await lines(page)).some((l) => l.includes("after")));
  const shown = await lines(page);
  for (const text of ["forged 0", "forged 1"]) {
    assert.ok(shown.some((l) => l.includes(text)), `"${text}" in ${JSON.stringify(shown)}`);
  }
  assert.ok(!shown.some((l) => /invalid/i.test(l)), `no "Invalid Date" in ${JSON.stringify(shown)}`);
  assert.deepEqual(errors, []);
  await page.close();
});

test("addresses a sender writes: links to http(s) only, the rest text", async () => {
  const { page, errors } = await openChat("cat", "forged-links");
  const texts = [
    "https://a.b/<script>alert(1)</script>",
    "https:javascript:alert(1)",
    "javascript:alert(1)//https://x.y",
    "https://user:pass@host.example/",
    "https://аpple.com/",
    "‮https://evil.example/‬ done",
    "HTTPS://UPPER.EXAMPLE/x",
    "https://[::1]:99999/",
    "http://",
  ];
  for (const message of texts) {
    redisCli("PUBLISH", "threadchat:room:forged-links", JSON.stringify({ nickname: "mallory", message, ts: Date.now() }));
  }
  await until("cat has them all", async () => (await lines(page)).some((l) => l.includes("http://")));
  const hrefs = await page.$$eval("#messages a", (links) => links.map((a) => a.href));
  for (const href of hrefs) assert.match(href, /^https?:\/\//i, `link ${href}`);
  assert.equal(await page.$$eval("#messages script, #messages img", (found) => found.length), 0);
  const shown = await lines(page);
  for (const message of texts) {
    assert.ok(shown.some((l) => l.includes(message)), `"${message}" shown as text in ${JSON.stringify(shown)}`);
  }
  assert.deepEqual(errors, []);
  await page.close();
});

test("a shared link with markup in its room neither joins nor makes markup", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  page.on("dialog", (dialog) => { errors.push(`dialog: ${dialog.message()}`); dialog.dismiss(); });
  const room = `<img src=x onerror=alert(1)>"'</title><b>`;
  await page.goto(`http://${relay.addr}/?room=${encodeURIComponent(room)}`);
  assert.equal(await page.evaluate(() => socket), null, "no connection before Join");
  assert.equal(await page.textContent("#join"), `Join #${room}`);
  assert.equal(await page.$$eval("img, b", (found) => found.length), 0);
  assert.deepEqual(errors, []);
  await page.close();
});

test("a message's direction marks stay in the message: the time after it is not reordered", async () => {
  const { page, errors } = await openChat("dan", "forged-bidi");
  // U+202E RIGHT-TO-LEFT OVERRIDE, never closed: any client may send it.
  const message = "\u202Ehello there";
  redisCli("PUBLISH", "threadchat:room:forged-bidi", JSON.stringify({ nickname: "mallory", message, ts: Date.now() }));
  await until("dan has it", async () => (await lines(page)).some((l) => l.includes("hello there")));
  const order = await page.$$eval("#messages li.chat", (items) => {
    const li = items.find((item) => item.textContent.includes("hello there"));
    const nick = li.querySelector(".nick").getBoundingClientRect();
    const time = li.querySelector("time").getBoundingClientRect();
    const range = document.createRange();
    const text = [...li.querySelectorAll("*"), li].flatMap((el) => [...el.childNodes])
      .find((node) => node.nodeType === Node.TEXT_NODE && node.data.includes("hello there"));
    range.selectNodeContents(text);
    const body = range.getBoundingClientRect();
    return { nick: nick.left, body: body.left, bodyRight: body.right, time: time.left };
  });
  assert.ok(order.nick < order.body, `the name comes first: ${JSON.stringify(order)}`);
  assert.ok(order.time >= order.bodyRight - 1, `the time comes after the message: ${JSON.stringify(order)}`);
  assert.deepEqual(errors, []);
  await page.close();
});
