// Headless Debian chromium logs in through the gate with the provider's username/password form.
// usage: node login.mjs URL USER PASSWORD SCREENSHOT.png   env: CHROMIUM, USER_DATA_DIR, GOTO, EXPECT_ANY, CLICK_TEXT,
//        EXPECT_TEXT, LOGOUT=1,
//        COOKIE_VALUES=1 (cookie values in the result too, to replay a session after logout)
// Prints one line `RESULT {json}` (urls, statuses, page text, cookie flags, errors) for the Rust test to assert on.
import puppeteer from 'puppeteer-core';

const [url, user, password, shot] = process.argv.slice(2);
const out = {};
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  userDataDir: process.env.USER_DATA_DIR,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
    '--disable-sync', '--no-first-run', '--disable-dev-shm-usage'],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(60000);
  await page.setViewport({ width: 1280, height: 800 });
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  out.loginPageUrl = page.url();
  await page.waitForSelector('#kc-form-login');
  await page.type('#username', user);
  await page.type('#password', password);
  const [resp] = await Promise.all([page.waitForNavigation({ waitUntil: 'domcontentloaded' }), page.click('#kc-login')]);
  out.afterLoginUrl = page.url();
  out.afterLoginStatus = resp ? resp.status() : null;
  if (process.env.GOTO) { // a page of the app, opened once logged in (a #fragment does not survive the login)
    await page.goto(process.env.GOTO, { waitUntil: 'domcontentloaded' });
    out.gotoUrl = page.url();
  }
  if (process.env.EXPECT_ANY) { // newline-separated texts: wait until one of them shows, report which
    const wanted = process.env.EXPECT_ANY.split('\n');
    await page.waitForFunction((ts) => document.body && ts.some((t) => document.body.innerText.includes(t)),
      { timeout: 90000 }, wanted);
    const text = await page.evaluate(() => document.body.innerText);
    out.found = wanted.find((t) => text.includes(t));
  }
  // Then click, in turn, what shows each of these newline-separated texts (a popover's button, a
  // table row to open it...), each waited for.
  for (const text of (process.env.CLICK_TEXT || '').split('\n').filter((t) => t)) {
    await page.locator(`::-p-text(${text})`).setTimeout(90000).click();
  }
  if (process.env.EXPECT_TEXT) {
    await page.waitForFunction((t) => document.body && document.body.innerText.includes(t), { timeout: 90000 },
      process.env.EXPECT_TEXT);
  }
  out.title = await page.title();
  out.text = (await page.evaluate(() => document.body ? document.body.innerText : '')).slice(0, 4000);
  const cdp = await page.createCDPSession();
  const jar = async () => (await cdp.send('Storage.getCookies')).cookies;
  out.cookies = (await jar()).map((c) => ({ name: c.name, httpOnly: c.httpOnly, sameSite: c.sameSite,
    ...(process.env.COOKIE_VALUES === '1' ? { value: c.value } : {}) }));
  await page.screenshot({ path: shot, fullPage: false });
  if (process.env.LOGOUT === '1') {
    await page.goto(new URL('/logout', url).href, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#kc-form-login'); // back at the provider's form: the session is gone
    out.afterLogoutUrl = page.url();
    out.cookiesAfterLogout = (await jar()).map((c) => c.name);
  }
} catch (e) {
  out.error = String(e && e.stack || e);
  // What the page showed when it failed, for the test's message (and its screenshot).
  const pages = await browser.pages().catch(() => []);
  const last = pages[pages.length - 1];
  if (last) {
    out.textOnError = (await last.evaluate(() => document.body ? document.body.innerText : '').catch(() => ''))
      .slice(0, 4000);
    await last.screenshot({ path: shot, fullPage: false }).catch(() => {});
  }
} finally {
  await browser.close();
}
console.log('RESULT ' + JSON.stringify(out));
