//! Secret settings given as files: every secret setting `CHAT_X` of both binaries also has a
//! `CHAT_X_FILE` form naming a file that holds the value (a Kubernetes Secret mounted as a
//! volume), so secrets need not sit in the environment where `/proc/PID/environ`, crash
//! reports and `kubectl describe` show them.

use std::path::Path;

/// Longest secret file read: secrets are short; anything bigger is the wrong file.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The value of secret setting `name` (`CHAT_X`), given directly or as a file (`CHAT_X_FILE`),
/// not both. A file's content is taken without its trailing line break (editors and
/// `kubectl create secret --from-file` add one). Returns the one line to print on failure.
pub fn setting(
    name: &str,
    value: Option<String>,
    file: Option<&Path>,
) -> Result<Option<String>, String> {
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("set either {name} or {name}_FILE, not both")),
        (value, None) => Ok(value),
        (None, Some(path)) => read(name, path).map(Some),
    }
}

fn read(name: &str, path: &Path) -> Result<String, String> {
    let cannot = |e: std::io::Error| format!("cannot read {name}_FILE {}: {e}", path.display());
    let len = std::fs::metadata(path).map_err(cannot)?.len();
    if len > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "{name}_FILE {} is {len} bytes; a secret file holds at most {MAX_SECRET_FILE_BYTES}",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(cannot)?;
    let value = text.strip_suffix('\n').unwrap_or(&text);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(format!("{name}_FILE {} is empty", path.display()));
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_or_file_not_both() {
        let dir = std::env::temp_dir().join(format!("chat-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        assert_eq!(
            setting("CHAT_T", None, Some(&file)).unwrap().as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            setting("CHAT_T", Some("v".into()), None)
                .unwrap()
                .as_deref(),
            Some("v")
        );
        assert_eq!(setting("CHAT_T", None, None).unwrap(), None);
        let both = setting("CHAT_T", Some("v".into()), Some(&file)).unwrap_err();
        assert!(both.contains("CHAT_T_FILE"), "{both}");
        let missing = setting("CHAT_T", None, Some(&dir.join("nope"))).unwrap_err();
        assert!(missing.contains("cannot read CHAT_T_FILE"), "{missing}");
        std::fs::write(&file, "\n").unwrap();
        assert!(setting("CHAT_T", None, Some(&file))
            .unwrap_err()
            .contains("empty"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
