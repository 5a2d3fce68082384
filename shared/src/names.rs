//! Names that come from people and remote parties: parsed once, never trusted raw.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The longest hostname a device may *send*; anything longer is refused outright.
pub const MAX_RAW_HOSTNAME: usize = 253;
/// The longest stored hostname (one DNS label).
pub const MAX_HOSTNAME: usize = 63;
/// The longest user, group or tag name.
pub const MAX_NAME: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is too long ({len} characters, at most {max})")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} {shown:?} has a character that is not allowed ({bad:?}); use a-z, 0-9, '-', '_' and '.'")]
    BadChar {
        kind: &'static str,
        shown: String,
        bad: char,
    },
}

/// A device hostname: lowercase DNS label `[a-z0-9-]{1,63}`, not starting or ending with `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    /// Turns whatever a device sent into a valid label: lowercases, maps runs of other
    /// characters to a single `-`, trims, truncates. Refuses input that is absurdly long
    /// (that is an error, not something to silently cut) and input with nothing usable.
    pub fn sanitize(raw: &str) -> Result<Self, NameError> {
        let len = raw.chars().count();
        if len > MAX_RAW_HOSTNAME {
            return Err(NameError::TooLong {
                kind: "hostname",
                len,
                max: MAX_RAW_HOSTNAME,
            });
        }
        // Only the first DNS label counts: "laptop.example.com" -> "laptop".
        let first = raw.split('.').next().unwrap_or("");
        let mut out = String::with_capacity(first.len().min(MAX_HOSTNAME));
        let mut dash = false;
        for c in first.chars() {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                out.push(c);
                dash = false;
            } else if !dash && !out.is_empty() {
                out.push('-');
                dash = true;
            }
            if out.len() >= MAX_HOSTNAME {
                break;
            }
        }
        let trimmed = out.trim_matches('-').to_string();
        if trimmed.is_empty() {
            return Err(NameError::Empty { kind: "hostname" });
        }
        Ok(Self(trimmed))
    }

    /// Strict parse: the string must already be a valid label.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let h = Self::sanitize(s)?;
        if h.0 != s {
            let bad = s
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
                .unwrap_or('-');
            return Err(NameError::BadChar {
                kind: "hostname",
                shown: shorten(s),
                bad,
            });
        }
        Ok(h)
    }

    /// `base` with a numeric suffix, still within the length limit: `laptop-2`.
    pub fn with_suffix(&self, n: u32) -> Self {
        let suffix = format!("-{n}");
        let keep = MAX_HOSTNAME.saturating_sub(suffix.len()).min(self.0.len());
        let base = self.0[..keep].trim_end_matches('-');
        Self(format!("{base}{suffix}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Hostname {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}
impl From<Hostname> for String {
    fn from(h: Hostname) -> String {
        h.0
    }
}
impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The DNS domain device names live under when none is configured.
pub const DEFAULT_DNS_DOMAIN: &str = "ward.internal";
/// The longest DNS domain: leaves room for a 63-character hostname and a dot within the
/// 253-character limit of a DNS name.
pub const MAX_DNS_DOMAIN: usize = 189;

/// The domain device names are published under (`HOSTNAME.<domain>`): one or more lowercase
/// DNS labels `[a-z0-9-]{1,63}` joined by dots, no label starting or ending with `-`. Given by
/// an administrator, so never sanitized: a typo is an error.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DnsDomain(String);

impl DnsDomain {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let kind = "DNS domain";
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() {
            return Err(NameError::Empty { kind });
        }
        let len = s.chars().count();
        if len > MAX_DNS_DOMAIN {
            return Err(NameError::TooLong {
                kind,
                len,
                max: MAX_DNS_DOMAIN,
            });
        }
        for label in s.split('.') {
            let bad = label
                .chars()
                .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'));
            let bad = match bad {
                Some(c) => Some(c),
                None if label.is_empty() => Some('.'),
                None if label.starts_with('-') || label.ends_with('-') => Some('-'),
                None if label.len() > MAX_HOSTNAME => {
                    return Err(NameError::TooLong {
                        kind: "DNS label",
                        len: label.len(),
                        max: MAX_HOSTNAME,
                    })
                }
                None => None,
            };
            if let Some(bad) = bad {
                return Err(NameError::BadChar {
                    kind,
                    shown: shorten(s),
                    bad,
                });
            }
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for DnsDomain {
    fn default() -> Self {
        Self(DEFAULT_DNS_DOMAIN.to_string())
    }
}
impl TryFrom<String> for DnsDomain {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}
impl From<DnsDomain> for String {
    fn from(d: DnsDomain) -> String {
        d.0
    }
}
impl fmt::Display for DnsDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A user, group or tag name: `[a-z0-9._@-]{1,64}`, given by an admin. Never sanitized:
/// an admin typo must be an error, not a different name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    pub fn parse(kind: &'static str, s: &str) -> Result<Self, NameError> {
        let len = s.chars().count();
        if len == 0 {
            return Err(NameError::Empty { kind });
        }
        if len > MAX_NAME {
            return Err(NameError::TooLong {
                kind,
                len,
                max: MAX_NAME,
            });
        }
        if let Some(bad) = s.chars().find(|c| {
            !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.' | '@'))
        }) {
            return Err(NameError::BadChar {
                kind,
                shown: shorten(s),
                bad,
            });
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse("name", &s)
    }
}
impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}
impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// At most 40 characters of untrusted input, for error messages.
pub fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitizes_hostnames() {
        assert_eq!(
            Hostname::sanitize("Alice's MacBook").unwrap().as_str(),
            "alice-s-macbook"
        );
        assert_eq!(
            Hostname::sanitize("db1.corp.example").unwrap().as_str(),
            "db1"
        );
        assert_eq!(
            Hostname::sanitize("a\"; DROP TABLE devices;--")
                .unwrap()
                .as_str(),
            "a-drop-table-devices"
        );
        assert_eq!(
            Hostname::sanitize("line\nbreak").unwrap().as_str(),
            "line-break"
        );
        assert!(matches!(
            Hostname::sanitize("'\"\n"),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            Hostname::sanitize(""),
            Err(NameError::Empty { .. })
        ));
        let long = "x".repeat(10_000);
        assert!(matches!(
            Hostname::sanitize(&long),
            Err(NameError::TooLong { len: 10_000, .. })
        ));
        assert_eq!(
            Hostname::sanitize(&"y".repeat(200)).unwrap().as_str().len(),
            MAX_HOSTNAME
        );
    }

    #[test]
    fn suffix_stays_within_limit() {
        let h = Hostname::sanitize(&"z".repeat(63)).unwrap();
        let s = h.with_suffix(12);
        assert_eq!(s.as_str().len(), 63);
        assert!(s.as_str().ends_with("-12"));
        assert_eq!(
            Hostname::parse("web").unwrap().with_suffix(2).as_str(),
            "web-2"
        );
    }

    #[test]
    fn strict_parse_rejects_unsanitized() {
        assert!(Hostname::parse("web-1").is_ok());
        assert!(Hostname::parse("Web").is_err());
        assert!(serde_json::from_str::<Hostname>("\"a b\"").is_err());
    }

    #[test]
    fn names_are_strict() {
        assert!(Name::parse("user", "alice").is_ok());
        assert!(Name::parse("user", "alice@corp.example").is_ok());
        assert!(matches!(
            Name::parse("user", "Alice"),
            Err(NameError::BadChar { bad: 'A', .. })
        ));
        assert!(matches!(
            Name::parse("user", "a'b"),
            Err(NameError::BadChar { bad: '\'', .. })
        ));
        assert!(matches!(
            Name::parse("user", "a\nb"),
            Err(NameError::BadChar { .. })
        ));
        assert!(matches!(
            Name::parse("user", ""),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            Name::parse("user", &"a".repeat(65)),
            Err(NameError::TooLong { .. })
        ));
    }

    #[test]
    fn dns_domains_are_lowercase_labels() {
        assert_eq!(
            DnsDomain::parse("ward.internal").unwrap().as_str(),
            "ward.internal"
        );
        assert_eq!(
            DnsDomain::parse("corp.example.").unwrap().as_str(),
            "corp.example"
        );
        assert_eq!(DnsDomain::default().as_str(), DEFAULT_DNS_DOMAIN);
        for bad in [
            "",
            ".",
            "Ward.internal",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "a_b",
        ] {
            assert!(DnsDomain::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DnsDomain::parse(&"a".repeat(64)).is_err());
        assert!(DnsDomain::parse(&["abc"; 60].join(".")).is_err());
    }
}
