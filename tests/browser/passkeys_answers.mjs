// The passkeys page (PAGE_URL on http://localhost) with the API stubbed inside chromium,
// to see what it shows for each answer it can get: a wrong password, a rate limit, no
// network, a second factor asked for (codes only), a wrong code, a dead ticket, passkeys
// turned off on the server, and a passkey prompt that ends without a passkey (a virtual
// authenticator that holds none). Reports one JSON line. Run by tests/api/pages.rs; see
// lib.mjs.
import { report, status, withPage } from "./lib.mjs";

const problem = (status, code, detail, extra = {}, headers = {}) => ({
  status,
  headers,
  contentType: "application/problem+json",
  body: JSON.stringify({ status, code, title: code, detail, ...extra }),
});

await withPage(async (page, watch) => {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("WebAuthn.enable", { enableUI: false });
  await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: { protocol: "ctap2", transport: "internal", hasResidentKey: true, hasUserVerification: true, isUserVerified: true },
  });

  // path -> the next answer (null: the network fails).
  const answers = {};
  const sent = [];
  const mfaBodies = [];
  await page.route("**/v1/**", async (route) => {
    const request = route.request();
    const path = new URL(request.url()).pathname;
    sent.push(`${request.method()} ${path}`);
    if (path === "/v1/auth/mfa") mfaBodies.push(JSON.parse(request.postData() ?? "null"));
    const answer = answers[path];
    if (!answer) await route.abort("internetdisconnected");
    else await route.fulfill(answer);
  });

  const results = {};
  const shown = async (name) => {
    results[name] = {
      ...(await status(page)),
      password_form: await page.locator("#password-form").isVisible(),
      mfa_form: await page.locator("#mfa-form").isVisible(),
      mfa_code: await page.locator("#mfa-code").isVisible(),
      mfa_passkey: await page.locator("#mfa-passkey").isVisible(),
      requests: sent.splice(0),
    };
  };
  const press = async (click) => {
    await page.evaluate(() => document.getElementById("status").removeAttribute("data-state"));
    await click();
    await page.waitForFunction(() =>
      ["success", "error", "info"].includes(document.getElementById("status")?.dataset.state)
    );
  };
  const signIn = () =>
    press(async () => {
      await page.getByLabel("Email").fill("someone@example.com");
      await page.getByLabel("Password", { exact: true }).fill("a password long enough");
      await page.getByRole("button", { name: "Sign in with password" }).click();
    });
  const enterCode = (code) =>
    press(async () => {
      await page.getByLabel("Code from your authenticator app, or a recovery code").fill(code);
      await page.getByRole("button", { name: "Continue" }).click();
    });

  answers["/v1/auth/login"] = problem(401, "invalid_credentials", "Invalid email or password.");
  await signIn();
  await shown("invalid_credentials");

  answers["/v1/auth/login"] = problem(429, "rate_limited", "Too many requests.", {}, { "Retry-After": "60" });
  await signIn();
  await shown("rate_limited");

  answers["/v1/auth/login"] = null;
  await signIn();
  await shown("offline");

  const mfa = { mfa_token: "ticket-never-checked", methods: ["totp", "recovery_code"] };
  answers["/v1/auth/login"] = problem(403, "mfa_required", "A second factor is required.", mfa);
  await signIn();
  await shown("mfa_required");

  answers["/v1/auth/mfa"] = problem(401, "invalid_mfa_code", "The code is not valid.");
  await enterCode("123 456");
  await shown("invalid_mfa_code");
  await enterCode("abcd-efgh-jkmn");
  await shown("invalid_recovery_code");

  answers["/v1/auth/mfa"] = problem(401, "invalid_token", "The MFA ticket is unknown, used or expired: log in again.");
  await enterCode("654321");
  await shown("ticket_gone");

  answers["/v1/auth/passkey/options"] = problem(404, "not_found", "Passkeys are not enabled on this server (set WEBAUTHN_RP_ID and WEBAUTHN_ORIGINS).");
  await press(() => page.getByRole("button", { name: "Sign in with a passkey" }).click());
  await shown("passkeys_off");

  // Real options for this origin: the authenticator has no passkey to offer.
  answers["/v1/auth/passkey/options"] = {
    status: 200,
    contentType: "application/json",
    body: JSON.stringify({
      challenge_id: "never-checked",
      options: {
        publicKey: { challenge: "c2V2ZW50eS1zaXgtYnl0ZXMtb2YtY2hhbGxlbmdl", timeout: 5000, rpId: "localhost", allowCredentials: [], userVerification: "required" },
        mediation: "conditional",
      },
    }),
  };
  await press(() => page.getByRole("button", { name: "Sign in with a passkey" }).click());
  await shown("no_passkey");

  report("answers", { results, violations: watch.violations, mfa_bodies: mfaBodies });
});
