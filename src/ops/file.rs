//! Reading a small file the configuration names (a key, a secret, a
//! credential): bounded, since the path may name anything (a device that
//! never ends, say); and, for a secret, refused when other users could
//! read it too, as ssh refuses a private key anyone can read.

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

/// The text of the secret `path` (at most `max` bytes), which `setting`
/// names; an error that says what to do when it cannot be read or when
/// its group or others may read it.
pub fn read_secret(path: &Path, max: u64, setting: &str) -> Result<String, String> {
    let cannot = |e: std::io::Error| {
        let hint = match e.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (the gateway runs as its own user: give the file to it, e.g. `chown hivegate: FILE`)"
            }
            _ => "",
        };
        format!("{setting}: cannot read {}: {e}{hint}", path.display())
    };
    let file = std::fs::File::open(path).map_err(cannot)?;
    private(path, &file, setting)?;
    let mut text = String::new();
    file.take(max).read_to_string(&mut text).map_err(cannot)?;
    Ok(text)
}

/// Copies `from` to `to`, readable by its owner only: written aside and
/// renamed, so nobody ever reads it half-written or open to others.
pub fn private_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let aside = to.with_extension(format!("{:?}.part", std::thread::current().id()));
    std::fs::copy(from, &aside)?;
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&aside, to)
}

/// Refuses the secret `path` when its group or others may read or write
/// it (a key copied with `cp` keeps 0644), with the command that fixes it.
fn private(path: &Path, file: &std::fs::File, setting: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = file
        .metadata()
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    // A device or pipe is not a key file; only regular files are judged.
    if meta.is_file() && mode & 0o077 != 0 {
        return Err(format!(
            "{setting}: {} may be read by other users (mode {mode:04o}): a secret must be \
             readable by its owner only; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_others_may_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kimi.key");
        std::fs::write(&path, "sk-1\n").unwrap();
        for (mode, ok) in [
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o600, true),
            (0o400, true),
        ] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let read = read_secret(&path, 64, "provider.kimi.api_key_file");
            match ok {
                true => assert_eq!(read.unwrap(), "sk-1\n"),
                false => {
                    let e = read.unwrap_err();
                    assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
                    assert!(e.contains(&format!("chmod 600 {}", path.display())), "{e}");
                    assert!(!e.contains("sk-1"), "{e}");
                }
            }
        }
        let e = read_secret(&dir.path().join("none"), 64, "x").unwrap_err();
        assert!(e.starts_with("x: cannot read"), "{e}");
    }
}
