// Drives Debian's Chromium (headless) through the grpc_web example's page, for tests/browser.rs.
// Environment: CHROMIUM (executable), PLAYWRIGHT_DIR (where playwright-core is installed),
// USER_DATA_DIR (a fresh, empty directory), APP_URL (the page on its own origin), FOREIGN_URL
// (the same page from another site), SIBLING_URL (a page on another port calling APP_URL's
// server), USER_ID / ORG_ID / ROLE (what to pick on the sign-in page).
// Prints one JSON line: what the page showed at each step.
import { createRequire } from "node:module";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const require = createRequire(env("PLAYWRIGHT_DIR") + "/");
const { chromium } = require("playwright-core");

const context = await chromium.launchPersistentContext(env("USER_DATA_DIR"), {
  executablePath: env("CHROMIUM"),
  headless: true,
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
  timeout: 60_000,
});
const console_ = [];
const report = {};
try {
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(30_000);
  page.on("console", (m) => console_.push(m.text()));
  page.on("pageerror", (e) => console_.push("pageerror: " + e.message));
  // What the page shows once its call (on load) is answered.
  const shown = async () => {
    await page.waitForSelector("body[data-done]");
    return page.$eval("#result", (o) => ({
      code: o.dataset.code,
      user: o.dataset.user,
      message: o.dataset.message,
      text: o.textContent,
    }));
  };

  // Signed out.
  await page.goto(env("APP_URL"));
  report.before = await shown();

  // (a) Sign in through the emulator's page, back with the cookies.
  await Promise.all([page.waitForURL((u) => !u.href.startsWith(env("APP_URL"))), page.click("#sign-in")]);
  report.signInPage = page.url();
  await page.selectOption("#user_id", env("USER_ID"));
  await page.selectOption("#org_id", env("ORG_ID"));
  await page.selectOption("#role", env("ROLE"));
  await Promise.all([page.waitForURL(env("APP_URL")), page.click("#sign-in")]);
  report.signedIn = await shown();
  const cookies = await context.cookies(env("APP_URL"));
  report.cookies = cookies.map(({ name, value, sameSite, httpOnly, path }) => ({ name, value, sameSite, httpOnly, path }));

  // (b) The __session cookie removed.
  await context.clearCookies({ name: "__session" });
  await page.reload();
  report.removed = await shown();

  // The cookies back in the jar; a page on another origin of the same site (another port),
  // among the authorized parties, calls with them (CORS preflight, credentials).
  await context.addCookies(cookies);
  await page.goto(env("SIBLING_URL"));
  report.sibling = await shown();

  // (c) The same page from another site: the browser refuses the cross-origin call (CORS).
  console_.length = 0;
  await page.goto(env("FOREIGN_URL"));
  report.foreign = await shown();
  report.foreignConsole = [...console_];
} finally {
  await context.close();
}
process.stdout.write(JSON.stringify(report) + "\n");
