//! The server API's keys (`CHAT_API_KEYS_DIR`): a directory with one file per key, as a
//! mounted Kubernetes Secret gives it. The file's name names the key (in logs: which key a
//! call used, never the key); its content is the key, without its trailing line break.
//! Several keys at once make rotation painless: add the new key, move the application to it,
//! remove the old one. Hidden entries and directories are skipped (a mounted Secret has
//! `..data` beside its keys). Read at start: a change is a rolling restart.
//!
//! A presented key is compared with every configured key as SHA-256 digests, in constant
//! time: neither the time an answer takes nor which key it stopped at tells anything about
//! the keys.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest key accepted: as guessable as a 128-bit random value at least.
pub const MIN_KEY_BYTES: usize = 32;
/// Most keys (files) in the directory.
pub const MAX_KEYS: usize = 16;
/// Longest key file read.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// The configured keys, by name, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    keys: Vec<(String, [u8; 32])>,
}

impl fmt::Debug for ApiKeys {
    /// The names only: keys never reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|(name, _)| name))
            .finish()
    }
}

fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

impl ApiKeys {
    /// Reads the keys directory. Errors are the one line to print (naming the setting).
    pub fn load(dir: &Path) -> Result<Self, String> {
        let setting = |what: String| format!("CHAT_API_KEYS_DIR {}: {what}", dir.display());
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| setting(e.to_string()))? {
            let path = entry.map_err(|e| setting(e.to_string()))?.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            match name {
                Some(name) if !name.starts_with('.') && !path.is_dir() => files.push((name, path)),
                _ => {}
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(setting("no key files".into()));
        }
        if files.len() > MAX_KEYS {
            return Err(setting(format!("more than {MAX_KEYS} key files")));
        }
        let mut keys = Vec::with_capacity(files.len());
        for (name, path) in files {
            let cannot = |e: std::io::Error| setting(format!("cannot read {name}: {e}"));
            if std::fs::metadata(&path).map_err(cannot)?.len() > MAX_KEY_FILE_BYTES {
                return Err(setting(format!(
                    "{name} is over {MAX_KEY_FILE_BYTES} bytes (not a key)"
                )));
            }
            let text = std::fs::read(&path).map_err(cannot)?;
            let key = text.strip_suffix(b"\n").unwrap_or(&text);
            let key = key.strip_suffix(b"\r").unwrap_or(key);
            if key.len() < MIN_KEY_BYTES {
                return Err(setting(format!(
                    "{name} is {} bytes; a key has at least {MIN_KEY_BYTES} (`openssl rand -hex 32`)",
                    key.len()
                )));
            }
            keys.push((name, digest(key)));
        }
        Ok(Self { keys })
    }

    /// The name of the key `presented` is, if any. Compares with every key, in constant time.
    pub fn check(&self, presented: &[u8]) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (name, key) in &self.keys {
            if bool::from(key.ct_eq(&presented)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// The keys' names, in file-name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|(name, _)| name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "chat-api-keys-{}-{}",
            std::process::id(),
            files.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..2026_01_01")).unwrap();
        for (name, content) in files {
            std::fs::write(dir.join(name), content).unwrap();
        }
        dir
    }

    #[test]
    fn several_keys_are_read_and_checked_by_name() {
        let old = "old-key-0123456789abcdef0123456789abcdef";
        let new = "new-key-0123456789abcdef0123456789abcdef";
        let d = dir(&[
            ("2026-01", &format!("{old}\n")),
            ("2026-02", new),
            (".hidden", "x"),
        ]);
        let keys = ApiKeys::load(&d).unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["2026-01", "2026-02"]);
        assert_eq!(keys.check(old.as_bytes()), Some("2026-01"));
        assert_eq!(keys.check(new.as_bytes()), Some("2026-02"));
        assert_eq!(keys.check(b""), None);
        assert_eq!(keys.check(&old.as_bytes()[1..]), None);
        assert!(
            !format!("{keys:?}").contains("key-0123"),
            "Debug shows names only"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn short_keys_and_empty_directories_are_refused_with_the_setting_named() {
        let d = dir(&[("short", "too-short\n")]);
        let e = ApiKeys::load(&d).unwrap_err();
        assert!(
            e.starts_with("CHAT_API_KEYS_DIR") && e.contains("at least 32"),
            "{e}"
        );
        std::fs::remove_file(d.join("short")).unwrap();
        let e = ApiKeys::load(&d).unwrap_err();
        assert!(e.contains("no key files"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
        let e = ApiKeys::load(&d).unwrap_err();
        assert!(e.starts_with("CHAT_API_KEYS_DIR"), "{e}");
    }
}
