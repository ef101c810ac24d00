// The passkeys page (PAGE_URL = http://localhost:PORT/account/passkeys) with a virtual
// authenticator (CDP's WebAuthn domain: a CTAP2 platform authenticator that keeps
// discoverable credentials and verifies its user), as a person would use it: sign in with
// EMAIL and PASSWORD, add a passkey named PASSKEY_NAME, reload (the page forgets the
// token), sign in with the passkey alone, sign out, then sign in with the password and the
// passkey as second factor. One JSON line per step; the tokens the API gave are read off
// the wire (the page keeps its own in memory only), for the test to use. Run by
// tests/api/pages.rs; see lib.mjs.
import { report, status, waitForTest, withPage } from "./lib.mjs";

const email = process.env.EMAIL;
const password = process.env.PASSWORD;
const passkeyName = process.env.PASSKEY_NAME;

await withPage(async (page, watch) => {
  if (!email || !password || !passkeyName) throw new Error("EMAIL, PASSWORD and PASSKEY_NAME must be set");
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("WebAuthn.enable", { enableUI: false });
  const { authenticatorId } = await cdp.send("WebAuthn.addVirtualAuthenticator", {
    options: {
      protocol: "ctap2",
      transport: "internal",
      hasResidentKey: true,
      hasUserVerification: true,
      isUserVerified: true,
      automaticPresenceSimulation: true,
    },
  });

  // What the page shows, and what it called since the last step.
  let seen = 0;
  const view = async () => {
    const requests = watch.apiRequests.slice(seen);
    seen = watch.apiRequests.length;
    return {
      ...(await status(page)),
      url: page.url(),
      signed_in: await page.locator("#signed-in").isVisible(),
      signed_out: await page.locator("#signed-out").isVisible(),
      mfa_form: await page.locator("#mfa-form").isVisible(),
      user_email: ((await page.locator("#user-email").textContent()) ?? "").trim(),
      passkeys: (await page.locator("#passkey-list li").allTextContents()).map((t) => t.trim()),
      // Where a token must never be: storage, cookies, the address bar.
      stored: await page.evaluate(() => ({
        local: Object.keys(localStorage),
        session: Object.keys(sessionStorage),
        cookies: document.cookie,
      })),
      api_requests: requests,
      violations: [...watch.violations],
    };
  };
  // Clicks, waits for the page's answer, and returns the JSON of the API response whose
  // path is `path` (if given).
  const act = async (click, path) => {
    await page.evaluate(() => document.getElementById("status").removeAttribute("data-state"));
    const response = path
      ? page.waitForResponse((r) => new URL(r.url()).pathname === path && r.request().method() === "POST")
      : null;
    await click();
    // Done (success, error) or asking for more (info: the second factor).
    await page.waitForFunction(() =>
      ["success", "error", "info"].includes(document.getElementById("status")?.dataset.state)
    );
    return response ? (await response).json() : null;
  };
  const signInWithPassword = () =>
    act(async () => {
      await page.getByLabel("Email").fill(email);
      await page.getByLabel("Password", { exact: true }).fill(password);
      await page.getByRole("button", { name: "Sign in with password" }).click();
    }, "/v1/auth/login");

  report("opened", { title: await page.title(), passkey_button: await page.locator("#passkey-sign-in").isVisible(), ...(await view()) });

  await signInWithPassword();
  report("password", await view());

  await act(async () => {
    await page.getByLabel("Name of the new passkey").fill(passkeyName);
    await page.getByLabel("Your current password").fill(password);
    await page.getByRole("button", { name: "Add a passkey" }).click();
  });
  const { credentials } = await cdp.send("WebAuthn.getCredentials", { authenticatorId });
  report("added", {
    ...(await view()),
    credentials: credentials.map((c) => ({ resident: c.isResidentCredential, rp_id: c.rpId, sign_count: c.signCount })),
  });

  // A fresh page: nothing of the signed-in state survives.
  await page.reload({ waitUntil: "load" });
  await page.waitForLoadState("networkidle");
  report("reloaded", await view());

  const passkeyLogin = await act(
    () => page.getByRole("button", { name: "Sign in with a passkey" }).click(),
    "/v1/auth/passkey"
  );
  report("passkey", { ...(await view()), access_token: passkeyLogin.access_token ?? null });
  // The test uses that token before the page signs out (else the two race).
  await waitForTest();

  await act(() => page.getByRole("button", { name: "Sign out" }).click());
  report("signed_out", await view());

  // The password alone is no longer enough: the page asks for the passkey.
  await signInWithPassword();
  const asked = { step: "second_factor_asked", ...(await view()) };
  const secondFactor = await act(() => page.getByRole("button", { name: "Use a passkey" }).click(), "/v1/auth/mfa");
  report("second_factor", { asked, ...(await view()), access_token: secondFactor.access_token ?? null });
});
