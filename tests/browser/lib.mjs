// Shared by the browser scripts that tests/api/pages.rs runs with node: launches Debian's
// chromium through playwright-core with a fresh profile, and reports to the Rust test as
// JSON lines on stdout (the test answers `continue` on stdin where a script waits for it).
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

let stdinLines = null;

export function report(step, fields) {
  process.stdout.write(JSON.stringify({ step, ...fields }) + "\n");
}

/** The test said `stop`: the script ends there, successfully. */
class Stopped extends Error {}

/** Waits for the test's `continue` (or `stop`). */
export async function waitForTest() {
  stdinLines ??= createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const { value, done } = await stdinLines.next();
  if (!done && value.trim() === "stop") throw new Stopped();
  if (done || value.trim() !== "continue") throw new Error(`expected "continue" from the test, got ${value}`);
}

/**
 * Runs `script(page, watch)` in a fresh chromium profile with PAGE_URL open. `watch`
 * holds what the page did besides loading itself: `apiRequests` (every other request)
 * and `violations` (CSP refusals and script errors). Exits 0 when `script` returns, 1
 * (reason on stderr) when anything throws.
 */
export async function withPage(script) {
  // A fresh profile: the test's own directory (it removes it even if it has to kill this
  // script), or one of ours.
  const given = process.env.PROFILE_DIR;
  const profile = given || mkdtempSync(join(tmpdir(), "latchkey-chromium-"));
  let context;
  try {
    const url = process.env.PAGE_URL;
    if (!url) throw new Error("PAGE_URL is not set");
    context = await chromium.launchPersistentContext(profile, {
      executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
      headless: true,
      args: ARGS,
    });
    const page = context.pages()[0] ?? (await context.newPage());
    page.setDefaultTimeout(30_000);
    const origin = new URL(url).origin;
    const watch = { apiRequests: [], violations: [] };
    page.on("request", (request) => {
      const u = new URL(request.url());
      const own = u.origin === origin;
      const asset = own && request.method() === "GET" && (u.pathname.startsWith("/account/") || u.pathname === "/favicon.ico");
      if (!asset) watch.apiRequests.push(`${request.method()} ${own ? u.pathname : u.href}`);
    });
    page.on("console", (message) => {
      if (/Content Security Policy|Refused to/i.test(message.text())) watch.violations.push(message.text());
    });
    page.on("pageerror", (error) => watch.violations.push(`script error: ${error.message}`));
    await page.goto(url, { waitUntil: "load" });
    // Anything the page would send by itself has been sent by now.
    await page.waitForLoadState("networkidle");
    await script(page, watch);
  } catch (error) {
    if (error instanceof Stopped) return;
    process.stderr.write(`browser script: ${error?.stack ?? error}\n`);
    process.exitCode = 1;
  } finally {
    await context?.close().catch(() => {});
    if (!given) rmSync(profile, { recursive: true, force: true });
    stdinLines?.return?.();
    process.stdin.destroy();
  }
}

/** The status region's text and state (`success`, `error`, `busy`, or null). */
export async function status(page) {
  const region = page.locator("#status");
  return { status: ((await region.textContent()) ?? "").trim(), state: await region.getAttribute("data-state") };
}

/** Waits until the page has shown the answer to its POST. */
export async function answered(page) {
  await page.waitForFunction(() => {
    const state = document.getElementById("status")?.dataset.state;
    return state === "success" || state === "error";
  });
}

/**
 * The flow of a mailed link: report what the opened page shows, wait for the test's
 * `continue`, let `act` fill in and press the button, and report the answer shown.
 */
export async function run(act) {
  await withPage(async (page, watch) => {
    const button = page.locator("#submit");
    await report("opened", {
      url: page.url(),
      title: await page.title(),
      ...(await status(page)),
      button_visible: await button.isVisible(),
      button_enabled: await button.isEnabled(),
      api_requests: [...watch.apiRequests],
      violations: [...watch.violations],
    });
    await waitForTest();
    // Whether the button is disabled while the POST is in flight.
    let disabledWhilePosting = null;
    await page.route("**/v1/**", async (route) => {
      disabledWhilePosting = await button.isDisabled();
      await route.continue();
    });
    await act(page, button);
    await answered(page);
    await report("submitted", {
      ...(await status(page)),
      disabled_while_posting: disabledWhilePosting,
      form_visible: await page.locator("#form").isVisible(),
      api_requests: [...watch.apiRequests],
      violations: [...watch.violations],
    });
  });
}
