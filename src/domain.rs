//! Values that can only exist valid: parsed once at the edge, trusted everywhere after.

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use crate::error::ApiError;

/// A normalised (trimmed, lower-cased) and validated email address.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub const MAX_LEN: usize = 254;

    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        let email = raw.trim().to_lowercase();
        let invalid = || ApiError::validation("email: not a valid email address");
        if email.is_empty() || email.len() > Self::MAX_LEN {
            return Err(invalid());
        }
        let (local, domain) = email.rsplit_once('@').ok_or_else(invalid)?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.contains('@')
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..");
        let domain_ok = domain.len() >= 3
            && domain.contains('.')
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        let chars_ok =
            !email.chars().any(|c| c.is_whitespace() || c.is_control() || "<>()[]\\,;:\"".contains(c));
        if local_ok && domain_ok && chars_ok { Ok(Self(email)) } else { Err(invalid()) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `{local}@example.com`, for sample mails (templates are rendered with them at start);
    /// `local` is a literal the caller knows to be a valid local part.
    pub(crate) fn example(local: &'static str) -> Self {
        Self(format!("{local}@example.com"))
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({})", self.0)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A password of 8..=1024 characters (characters, not bytes). Never printed.
pub struct Password(SecretString);

impl Password {
    pub const MIN_CHARS: usize = 8;
    pub const MAX_CHARS: usize = 1024;

    /// For a new password: length rules apply.
    pub fn new(raw: String) -> Result<Self, ApiError> {
        let chars = raw.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(ApiError::validation("password: must be at least 8 characters"));
        }
        Self::candidate(raw)
    }

    /// For a login attempt: only the upper bound applies (it caps hashing work); a short
    /// password is simply wrong, answered like any wrong password.
    pub fn candidate(raw: String) -> Result<Self, ApiError> {
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(ApiError::validation("password: must be at most 1024 characters"));
        }
        Ok(Self(SecretString::from(raw)))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        let e = Email::parse("  Alice@Example.COM ").expect("valid");
        assert_eq!(e.as_str(), "alice@example.com");
    }

    #[test]
    fn invalid_emails_are_refused() {
        for bad in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@b..com",
            "a@-b.com",
            ".a@b.com",
            "a<@b.com",
            "a@b\n.com",
            "a@b_c.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn password_length_counts_characters() {
        assert!(Password::new("short".into()).is_err());
        assert!(Password::new("ééééééé".into()).is_err(), "7 chars, 14 bytes");
        assert!(Password::new("éééééééé".into()).is_ok());
        assert!(Password::new("x".repeat(1024)).is_ok());
        assert!(Password::new("x".repeat(1025)).is_err());
        assert!(Password::candidate("short".into()).is_ok());
        assert!(Password::candidate("é".repeat(1025)).is_err());
    }

    #[test]
    fn password_debug_hides_it() {
        let p = Password::new("correct horse battery".into()).expect("valid");
        assert!(!format!("{p:?}").contains("horse"));
    }
}
