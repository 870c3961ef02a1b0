// What both browser test files need: where the server and the browser
// are, how long to wait, a free port, and waiting for a condition.

import { createServer } from "node:net";

export const BIN = process.env.THREADCHAT_BIN ?? new URL("../../target/debug/threadchat", import.meta.url).pathname;
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
/** How long any one expected thing may take. */
export const PATIENCE = 15_000;

/** A port nobody listens on now. */
export function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

/** Waits until `check()` holds, or fails naming `what`. */
export async function until(what, check) {
  const deadline = Date.now() + PATIENCE;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The text of each line in a page's message pane. */
export const lines = (page) => page.$$eval("#messages li", (items) => items.map((li) => li.textContent));
