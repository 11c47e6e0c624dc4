//! Reading a small file the configuration names (a key, a secret, a
//! credential): bounded, since the path may name anything (a device that
//! never ends, say).

use std::io::Read;
use std::path::Path;

/// The text of `path`, at most `max` bytes of it.
pub fn read_small(path: &Path, max: u64) -> std::io::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(max)
        .read_to_string(&mut text)?;
    Ok(text)
}
