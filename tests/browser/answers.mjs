// Opens the reset page (PAGE_URL, with a token that is never checked) and stubs the API,
// to see what the page shows for each answer it can get: two different passwords (no
// request), weak_password, rate_limited, an unexpected error, no network, and finally
// invalid_one_time_token. Reports one JSON line. Run by tests/api/pages.rs; see lib.mjs.
import { answered, report, status, withPage } from "./lib.mjs";

const problem = (status, code, detail, headers = {}) => ({
  status,
  headers,
  contentType: "application/problem+json",
  body: JSON.stringify({ status, code, title: code, detail }),
});

const ANSWERS = [
  ["weak_password", problem(400, "weak_password", "Add another word or two. Uncommon words are better.")],
  ["validation_failed", problem(400, "validation_failed", "new_password: at most 1024 characters.")],
  ["rate_limited", problem(429, "rate_limited", "Too many requests.", { "Retry-After": "120" })],
  ["internal", problem(500, "internal", "Internal error.")],
  ["offline", null],
  ["invalid_mfa_code", problem(401, "invalid_mfa_code", "This account has a second factor.")],
  ["invalid_one_time_token", problem(400, "invalid_one_time_token", "The link is invalid.")],
];

await withPage(async (page, watch) => {
  const results = {};
  const sent = [];
  let next = null;
  await page.route("**/v1/auth/password/reset", async (route) => {
    sent.push(JSON.parse(route.request().postData() ?? "null"));
    if (next === null) await route.abort("internetdisconnected");
    else await route.fulfill(next);
  });
  const button = page.locator("#submit");
  const fill = async (a, b) => {
    await page.getByLabel("New password", { exact: true }).fill(a);
    await page.getByLabel("Repeat the new password").fill(b);
  };

  await fill("first password here", "second password here");
  await button.click();
  results.mismatch = { ...(await status(page)), requests: sent.length };

  for (const [name, answer] of ANSWERS) {
    next = answer;
    await fill("a password long enough", "a password long enough");
    await page.evaluate(() => document.getElementById("status").removeAttribute("data-state"));
    await button.click();
    await answered(page);
    results[name] = {
      ...(await status(page)),
      form_visible: await page.locator("#form").isVisible(),
      button_enabled: await button.isEnabled(),
    };
  }
  report("answers", { results, sent, violations: watch.violations });
});
