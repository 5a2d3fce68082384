//! The operating system (os-release) and the kernel release.

use std::io;
use std::path::Path;

use ward_shared::names::shorten;
use ward_shared::posture::OsInfo;

use super::read_text;

/// Largest os-release file read.
const MAX_OS_RELEASE: usize = 64 * 1024;
/// Largest kernel release read.
const MAX_KERNEL_RELEASE: usize = 256;

/// Parses an os-release file (os-release(5)): `KEY=VALUE` lines, `#` comments and blank lines;
/// values unquoted, in single quotes (literal) or double quotes (where `\"`, `\\`, `\$` and
/// `` \` `` are escapes), or a mix of those, as in a shell; outside quotes a backslash escapes
/// the next character. No variable expansion. The last assignment to a key wins.
///
/// Strict, since a file that does not parse cannot be trusted to say which system this is: a
/// line that is not `KEY=VALUE`, an unterminated quote, a missing or invalid `ID` are errors.
/// `VERSION_ID` is empty when absent (rolling releases); `PRETTY_NAME` defaults to `Linux`
/// as the specification says.
pub fn parse_os_release(text: &str) -> Result<OsInfo, String> {
    let (mut id, mut version, mut pretty) = (None, None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |why: &str| format!("line {}: {why}", n + 1);
        let Some((key, raw)) = line.split_once('=') else {
            return Err(at("expected KEY=VALUE"));
        };
        if !valid_key(key) {
            return Err(at("invalid key"));
        }
        let value = unquote(raw).map_err(at)?;
        match key {
            "ID" => id = Some(value),
            "VERSION_ID" => version = Some(value),
            "PRETTY_NAME" => pretty = Some(value),
            _ => {}
        }
    }
    let Some(id) = id else {
        return Err("no ID".to_string());
    };
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "ID {:?} is not a valid operating system id",
            shorten(&id)
        ));
    }
    let version = version.unwrap_or_default();
    if version.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "VERSION_ID {:?} contains spaces",
            shorten(&version)
        ));
    }
    Ok(OsInfo {
        id,
        version,
        pretty: pretty.unwrap_or_else(|| "Linux".to_string()),
    })
}

/// Parses `/proc/sys/kernel/osrelease` (what `uname -r` prints): one non-empty line.
pub fn parse_kernel_release(text: &str) -> Result<String, String> {
    let release = text.strip_suffix('\n').unwrap_or(text);
    if release.is_empty() {
        return Err("empty kernel release".to_string());
    }
    if release.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "kernel release {:?} is not one word",
            shorten(release)
        ));
    }
    Ok(release.to_string())
}

/// `etc/os-release` under `root`, or `usr/lib/os-release` when the first does not exist.
pub(crate) fn read_os(root: &Path) -> Result<OsInfo, String> {
    let mut tried = Vec::new();
    for rel in ["etc/os-release", "usr/lib/os-release"] {
        match read_text(&root.join(rel), MAX_OS_RELEASE) {
            Ok(text) => return parse_os_release(&text).map_err(|e| format!("/{rel}: {e}")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => tried.push(format!("/{rel}")),
            Err(e) => return Err(format!("/{rel}: {e}")),
        }
    }
    Err(format!("{} not found", tried.join(" and ")))
}

pub(crate) fn read_kernel(root: &Path) -> Result<String, String> {
    let rel = "proc/sys/kernel/osrelease";
    let text =
        read_text(&root.join(rel), MAX_KERNEL_RELEASE).map_err(|e| format!("/{rel}: {e}"))?;
    parse_kernel_release(&text).map_err(|e| format!("/{rel}: {e}"))
}

fn valid_key(k: &str) -> bool {
    let mut cs = k.chars();
    matches!(cs.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Shell-style unquoting of one value.
fn unquote(raw: &str) -> Result<String, &'static str> {
    let mut out = String::new();
    let mut cs = raw.chars();
    while let Some(c) = cs.next() {
        match c {
            '\'' => loop {
                match cs.next() {
                    None => return Err("unterminated single quote"),
                    Some('\'') => break,
                    Some(c) => out.push(c),
                }
            },
            '"' => loop {
                match cs.next() {
                    None => return Err("unterminated double quote"),
                    Some('"') => break,
                    Some('\\') => match cs.next() {
                        None => return Err("unterminated double quote"),
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                    },
                    Some(c) => out.push(c),
                }
            },
            '\\' => match cs.next() {
                None => return Err("backslash at the end of the line"),
                Some(c) => out.push(c),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(text: &str) -> OsInfo {
        parse_os_release(text).unwrap()
    }

    #[test]
    fn debian_12() {
        let o = os(include_str!("fixtures/os-release/debian-12"));
        assert_eq!(o.id, "debian");
        assert_eq!(o.version, "12");
        assert_eq!(o.pretty, "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn ubuntu_24_04() {
        let o = os(include_str!("fixtures/os-release/ubuntu-24.04"));
        assert_eq!((o.id.as_str(), o.version.as_str()), ("ubuntu", "24.04"));
        assert_eq!(o.pretty, "Ubuntu 24.04.1 LTS");
    }

    #[test]
    fn fedora_40() {
        let o = os(include_str!("fixtures/os-release/fedora-40"));
        assert_eq!((o.id.as_str(), o.version.as_str()), ("fedora", "40"));
        assert_eq!(o.pretty, "Fedora Linux 40 (Workstation Edition)");
    }

    #[test]
    fn arch_has_no_version() {
        let o = os(include_str!("fixtures/os-release/arch"));
        assert_eq!((o.id.as_str(), o.version.as_str()), ("arch", ""));
        assert_eq!(o.pretty, "Arch Linux");
    }

    #[test]
    fn alpine() {
        let o = os(include_str!("fixtures/os-release/alpine-3.20"));
        assert_eq!((o.id.as_str(), o.version.as_str()), ("alpine", "3.20.3"));
        assert_eq!(o.pretty, "Alpine Linux v3.20");
    }

    #[test]
    fn quoting_rules() {
        let o = os(include_str!("fixtures/os-release/quoting"));
        assert_eq!(o.id, "my-os");
        assert_eq!(o.version, "1.0");
        assert_eq!(o.pretty, r#"My "quoted" $OS \n 'x' `y`"#);
    }

    #[test]
    fn malformed_file_is_an_error() {
        let e = parse_os_release(include_str!("fixtures/os-release/malformed")).unwrap_err();
        assert_eq!(e, "line 3: unterminated double quote");
    }

    #[test]
    fn errors() {
        let cases = [
            ("NAME=x\n", "no ID"),
            ("", "no ID"),
            ("ID=debian\njust words\n", "line 2: expected KEY=VALUE"),
            ("ID=debian\n1KEY=x\n", "line 2: invalid key"),
            ("KEY =x\nID=debian\n", "line 1: invalid key"),
            ("ID='debian\n", "line 1: unterminated single quote"),
            ("ID=debian\\\n", "line 1: backslash at the end of the line"),
            (
                "ID=Debian\n",
                "ID \"Debian\" is not a valid operating system id",
            ),
            ("ID=\"\"\n", "ID \"\" is not a valid operating system id"),
            (
                "ID=debian\nVERSION_ID=\"1 2\"\n",
                "VERSION_ID \"1 2\" contains spaces",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_os_release(text).unwrap_err(), want, "{text:?}");
        }
    }

    #[test]
    fn defaults_and_last_assignment_wins() {
        let o = os("ID=old\nID=new\n");
        assert_eq!(o.id, "new");
        assert_eq!(o.version, "");
        assert_eq!(o.pretty, "Linux");
    }

    #[test]
    fn kernel_release() {
        assert_eq!(
            parse_kernel_release("6.1.0-18-amd64\n").unwrap(),
            "6.1.0-18-amd64"
        );
        assert_eq!(
            parse_kernel_release("\n").unwrap_err(),
            "empty kernel release"
        );
        assert_eq!(
            parse_kernel_release("").unwrap_err(),
            "empty kernel release"
        );
        assert!(parse_kernel_release("6.1 x\n").is_err());
        assert!(parse_kernel_release("6.1\n\n").is_err());
    }

    #[test]
    fn reads_with_fallback_under_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(
            read_os(root).unwrap_err(),
            "/etc/os-release and /usr/lib/os-release not found"
        );
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/os-release"), "ID=arch\n").unwrap();
        assert_eq!(read_os(root).unwrap().id, "arch");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/os-release"), "ID=\"x\n").unwrap();
        assert_eq!(
            read_os(root).unwrap_err(),
            "/etc/os-release: line 1: unterminated double quote"
        );
        assert!(read_kernel(root)
            .unwrap_err()
            .starts_with("/proc/sys/kernel/osrelease: "));
        std::fs::create_dir_all(root.join("proc/sys/kernel")).unwrap();
        std::fs::write(root.join("proc/sys/kernel/osrelease"), "6.1.0-18-amd64\n").unwrap();
        assert_eq!(read_kernel(root).unwrap(), "6.1.0-18-amd64");
    }
}
