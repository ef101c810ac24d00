// Opens a verify-email or confirm-email link (PAGE_URL), reports, and on `continue`
// presses the page's button. Run by tests/api/pages.rs; see lib.mjs.
import { run } from "./lib.mjs";

await run(async (_page, button) => {
  await button.click();
});
