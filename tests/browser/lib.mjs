// Shared by the browser scripts that tests/api/pages.rs runs with node: launches Debian's
// chromium through playwright-core, opens PAGE_URL, and talks to the Rust test over
// stdin/stdout (one JSON report per line; the test answers `continue` to go on).
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

// Without the background-networking flags chromium keeps calling Google's services,
// which floods a closed network (and slows the test).
const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const stdinLines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

export function report(step, fields) {
  process.stdout.write(JSON.stringify({ step, ...fields }) + "\n");
}

/** Waits for the test's `continue`. */
export async function waitForTest() {
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== "continue") throw new Error(`expected "continue" from the test, got ${value}`);
}

/**
 * Runs `flow(session)` against a fresh chromium profile with PAGE_URL open; exits 0 when
 * the flow returns, 1 (reason on stderr) when anything throws.
 */
export async function run(flow) {
  const url = process.env.PAGE_URL;
  if (!url) throw new Error("PAGE_URL is not set");
  const profile = mkdtempSync(join(tmpdir(), "latchkey-chromium-"));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      headless: true,
      args: ARGS,
    });
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(30_000);
    const origin = new URL(url).origin;
    // Every request the page makes besides loading itself and its own assets: opening
    // the page must make none.
    const apiRequests = [];
    page.on("request", (request) => {
      const u = new URL(request.url());
      const asset = request.method() === "GET" && (u.pathname.startsWith("/account/") || u.pathname === "/favicon.ico");
      if (u.origin !== origin || !asset) apiRequests.push(`${request.method()} ${u.origin === origin ? u.pathname : u.href}`);
    });
    // CSP refusals and script errors: the page must run clean under its own policy.
    const violations = [];
    page.on("console", (message) => {
      const text = message.text();
      if (/Content Security Policy|Refused to/i.test(text)) violations.push(text);
    });
    page.on("pageerror", (error) => violations.push(`script error: ${error.message}`));

    await page.goto(url, { waitUntil: "load" });
    await page.waitForLoadState("networkidle");
    const status = () => page.locator("#status").textContent().then((t) => (t ?? "").trim());
    const button = page.locator("#submit");
    await report("opened", {
      url: page.url(),
      title: await page.title(),
      status: await status(),
      button_visible: await button.isVisible(),
      button_enabled: await button.isEnabled(),
      api_requests: [...apiRequests],
      violations: [...violations],
    });
    await waitForTest();

    // Whether the button is disabled while the POST is in flight.
    let disabledWhilePosting = null;
    await page.route("**/v1/**", async (route) => {
      disabledWhilePosting = await button.isDisabled();
      await route.continue();
    });
    await flow({ page, button });
    await page.waitForFunction(() => {
      const state = document.getElementById("status")?.dataset.state;
      return state === "success" || state === "error";
    });
    await report("submitted", {
      status: await status(),
      state: await page.locator("#status").getAttribute("data-state"),
      disabled_while_posting: disabledWhilePosting,
      form_visible: await page.locator("#form").isVisible(),
      api_requests: [...apiRequests],
      violations: [...violations],
    });
  } catch (error) {
    process.stderr.write(`browser script: ${error?.stack ?? error}\n`);
    process.exitCode = 1;
  } finally {
    await context?.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
    process.stdin.destroy();
  }
}
