//! Mail, a room of its own (issue 15): services describe a mail with the typed [`Mail`]
//! and queue it with [`Outbox::enqueue`] inside their own transaction; nothing else here
//! is theirs to touch. `templates` renders it (built-in texts, overridable file by file
//! from `EMAIL_TEMPLATES_DIR`), `outbox` stores the rendered mail as an `email_outbox`
//! row, `worker` leases due rows and hands them to `transport` (SMTP through lettre, or
//! `.eml` files in `MAIL_DIR` for development), retrying temporary failures with
//! exponential backoff.

pub mod outbox;
pub mod templates;
pub mod transport;
pub mod worker;

pub use outbox::{LinkPage, Outbox};
pub use templates::Templates;
pub use worker::MailWorker;

use crate::domain::Email;

/// Every mail Latchkey sends. Links are complete URLs (see [`Outbox::link`]); lifetimes
/// are shown to the reader as written (`"24h"`).
#[derive(Clone, Debug)]
pub enum Mail {
    /// A link that confirms `to` belongs to the person who signed up.
    VerifyEmail { to: Email, link: String, expires_in: String },
    /// Someone tried to register `to`, which already has an account; `link` resets the password.
    SignupAttempt { to: Email, link: String },
    /// A password-reset link.
    ResetPassword { to: Email, link: String, expires_in: String },
    /// A notice that the password changed.
    PasswordChanged { to: Email },
    /// Sent to the new address: a link that applies the change.
    ConfirmNewEmail { to: Email, new_email: Email, link: String, expires_in: String },
    /// Sent to the old address: a notice that a change to `new_email` was asked for.
    EmailChanging { to: Email, new_email: Email },
    /// A notice that the account is gone.
    AccountDeleted { to: Email },
    /// A sign-in from a device not seen before; `link` goes to the session list.
    NewSignIn { to: Email, device: String, ip: String, location: Option<String>, time: String, link: String },
}

/// The template of every [`Mail`], in a fixed order (also the metrics' label set).
pub const TEMPLATE_NAMES: [&str; 8] = [
    "verify_email",
    "signup_attempt",
    "reset_password",
    "password_changed",
    "confirm_new_email",
    "email_changing",
    "account_deleted",
    "new_sign_in",
];

impl Mail {
    /// The template's base name: its files are `{name}.subject.txt`, `{name}.txt` and
    /// `{name}.html`.
    pub fn template(&self) -> &'static str {
        match self {
            Mail::VerifyEmail { .. } => "verify_email",
            Mail::SignupAttempt { .. } => "signup_attempt",
            Mail::ResetPassword { .. } => "reset_password",
            Mail::PasswordChanged { .. } => "password_changed",
            Mail::ConfirmNewEmail { .. } => "confirm_new_email",
            Mail::EmailChanging { .. } => "email_changing",
            Mail::AccountDeleted { .. } => "account_deleted",
            Mail::NewSignIn { .. } => "new_sign_in",
        }
    }

    pub fn recipient(&self) -> &Email {
        match self {
            Mail::VerifyEmail { to, .. }
            | Mail::SignupAttempt { to, .. }
            | Mail::ResetPassword { to, .. }
            | Mail::PasswordChanged { to }
            | Mail::ConfirmNewEmail { to, .. }
            | Mail::EmailChanging { to, .. }
            | Mail::AccountDeleted { to }
            | Mail::NewSignIn { to, .. } => to,
        }
    }

    /// The template variables besides `product_name`. `email` is always the recipient.
    fn variables(&self) -> Vec<(&'static str, minijinja::Value)> {
        use minijinja::Value;
        let mut vars = vec![("email", Value::from(self.recipient().as_str()))];
        match self {
            Mail::VerifyEmail { link, expires_in, .. } | Mail::ResetPassword { link, expires_in, .. } => {
                vars.push(("link", Value::from(link.as_str())));
                vars.push(("expires_in", Value::from(expires_in.as_str())));
            }
            Mail::SignupAttempt { link, .. } => vars.push(("link", Value::from(link.as_str()))),
            Mail::PasswordChanged { .. } | Mail::AccountDeleted { .. } => {}
            Mail::ConfirmNewEmail { new_email, link, expires_in, .. } => {
                vars.push(("new_email", Value::from(new_email.as_str())));
                vars.push(("link", Value::from(link.as_str())));
                vars.push(("expires_in", Value::from(expires_in.as_str())));
            }
            Mail::EmailChanging { new_email, .. } => {
                vars.push(("new_email", Value::from(new_email.as_str())));
            }
            Mail::NewSignIn { device, ip, location, time, link, .. } => {
                vars.push(("device", Value::from(device.as_str())));
                vars.push(("ip", Value::from(ip.as_str())));
                vars.push(("location", Value::from(location.clone())));
                vars.push(("time", Value::from(time.as_str())));
                vars.push(("link", Value::from(link.as_str())));
            }
        }
        vars
    }

    /// One mail of each kind with sample values: what start-up renders to validate every
    /// template, and what the template tests use.
    pub fn samples() -> Vec<Mail> {
        let to = Email::example("someone");
        let new_email = Email::example("someone.new");
        let link = "https://app.example.com/verify-email#token=sample".to_owned();
        vec![
            Mail::VerifyEmail { to: to.clone(), link: link.clone(), expires_in: "24h".into() },
            Mail::SignupAttempt { to: to.clone(), link: link.clone() },
            Mail::ResetPassword { to: to.clone(), link: link.clone(), expires_in: "30m".into() },
            Mail::PasswordChanged { to: to.clone() },
            Mail::ConfirmNewEmail {
                to: new_email.clone(),
                new_email: new_email.clone(),
                link: link.clone(),
                expires_in: "1h".into(),
            },
            Mail::EmailChanging { to: to.clone(), new_email },
            Mail::AccountDeleted { to: to.clone() },
            Mail::NewSignIn {
                to,
                device: "Firefox on Linux".into(),
                ip: "203.0.113.7".into(),
                location: Some("Berlin, DE".into()),
                time: "2026-12-10 12:00 UTC".into(),
                link,
            },
        ]
    }
}

/// A mail rendered: what an outbox row stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: String,
}
