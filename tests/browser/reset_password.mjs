// Opens a password-reset link (PAGE_URL), reports, and on `continue` types NEW_PASSWORD
// twice and submits. Run by tests/api/pages.rs; see lib.mjs.
import { run } from "./lib.mjs";

const password = process.env.NEW_PASSWORD;
await run(async (page, button) => {
  if (!password) throw new Error("NEW_PASSWORD is not set");
  await page.getByLabel("New password", { exact: true }).fill(password);
  await page.getByLabel("Repeat the new password").fill(password);
  await button.click();
});
