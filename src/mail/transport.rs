//! Delivery of one rendered mail: over SMTP (lettre, from `SMTP_URL`), or, without
//! `SMTP_URL`, as an `.eml` file in `MAIL_DIR` for development. Nothing outside the mail
//! module sees SMTP.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use secrecy::ExposeSecret as _;

use crate::config::Config;
use crate::store::entity::email_outbox;

/// How long one SMTP conversation may take; `MAIL_LEASE` must be longer, or a slow send
/// could be leased (and sent) again by another worker.
pub const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(PathBuf),
}

/// Why a send failed: `permanent` (a 5xx, an address that cannot be a recipient) is not
/// retried; anything else (4xx, connection, TLS, timeout, I/O) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub permanent: bool,
    pub reason: String,
}

impl SendError {
    fn permanent(reason: impl Into<String>) -> Self {
        Self { permanent: true, reason: reason.into() }
    }
}

impl Transport {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        match &config.smtp_url {
            Some(url) => {
                let smtp = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
                    // The URL holds credentials: never in the message.
                    .map_err(|_| anyhow::anyhow!("SMTP_URL is not a valid SMTP URL"))?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build();
                Ok(Transport::Smtp(smtp))
            }
            None => {
                tracing::warn!(
                    dir = %config.mail_dir.display(),
                    "SMTP_URL is not set: mails are written as .eml files into MAIL_DIR. \
                     This is for development; the files hold live links."
                );
                Ok(Transport::Files(config.mail_dir.clone()))
            }
        }
    }

    pub async fn send(&self, message: &Message, id: uuid::Uuid) -> Result<(), SendError> {
        match self {
            Transport::Smtp(smtp) => smtp
                .send_raw(message.envelope(), &message.formatted())
                .await
                .map(|_| ())
                .map_err(|e| SendError { permanent: e.is_permanent(), reason: smtp_error(&e) }),
            Transport::Files(dir) => write_eml(dir, id, &message.formatted()).await.map_err(|e| SendError {
                permanent: false,
                reason: format!("writing into MAIL_DIR {}: {e:#}", dir.display()),
            }),
        }
    }
}

/// lettre's error with its cause chain (the server's reply is in the source).
fn smtp_error(e: &lettre::transport::smtp::Error) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        reason.push_str(": ");
        reason.push_str(&cause.to_string());
        source = cause.source();
    }
    reason
}

/// Written under a temporary name, then renamed: a reader never sees half a mail.
async fn write_eml(dir: &std::path::Path, id: uuid::Uuid, bytes: &[u8]) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir).await.context("creating the directory")?;
    let tmp = dir.join(format!(".{id}.eml.tmp"));
    let path = dir.join(format!("{id}.eml"));
    tokio::fs::write(&tmp, bytes).await.context("writing")?;
    tokio::fs::rename(&tmp, &path).await.context("renaming")?;
    Ok(())
}

/// The MIME message of an outbox row: text and HTML alternatives, and the row's id as
/// `Message-ID`, so a mail sent again after a lost acknowledgement is recognisably the same.
pub fn message(from: &Mailbox, row: &email_outbox::Model) -> Result<Message, SendError> {
    let to: Mailbox = row
        .recipient
        .parse()
        .map_err(|e| SendError::permanent(format!("the recipient is not a valid address: {e}")))?;
    let domain = from.email.domain();
    Message::builder()
        .from(from.clone())
        .to(to)
        .subject(row.subject.clone())
        .message_id(Some(format!("<{}@{domain}>", row.id)))
        .multipart(MultiPart::alternative_plain_html(row.text_body.clone(), row.html_body.clone()))
        .map_err(|e| SendError::permanent(format!("building the message: {e}")))
}
