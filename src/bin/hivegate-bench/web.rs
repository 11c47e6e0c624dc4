//! `web N`: the web chat in a room of N messages, in headless Chromium
//! (tests/web/perf.mjs, with the playwright-core and Chromium that
//! `.ci/web-setup` installs): frame times while reading back through the
//! room and down again from script, display frames dropped doing the same
//! with the mouse wheel, long tasks, the time from a live message's arrival
//! to the screen, and the page's element count. SLOWDOWN above 1 slows the
//! page's main thread that many times (Chromium's CPU throttling), as on a
//! phone; raster and the compositor keep the machine's speed.

use super::{start_gateway, NO_RATE_LIMITS};
use std::path::PathBuf;
use std::process::Command;

pub fn run(n: usize, slowdown: usize) -> Result<(), String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    if !dir.join("node_modules/playwright-core").exists() {
        return Err("playwright-core is missing: run .ci/web-setup".into());
    }
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or("chromium is missing: run .ci/web-setup")?;
    let gw = start_gateway(NO_RATE_LIMITS)?;
    let status = Command::new("node")
        .arg(dir.join("perf.mjs"))
        .current_dir(&dir)
        .env("BASE_URL", format!("http://{}", gw.addr))
        .env("CHROMIUM", chromium)
        .env("N", n.to_string())
        .env("SLOWDOWN", slowdown.to_string())
        .status()
        .map_err(|e| format!("cannot run node: {e}"))?;
    if !status.success() {
        return Err(format!("the browser script failed: {status}"));
    }
    Ok(())
}
