//! The mails' texts: minijinja templates, built in (compiled into the binary) and
//! overridable file by file from `EMAIL_TEMPLATES_DIR`.
//!
//! Each mail has three files: `{name}.subject.txt`, `{name}.txt` and `{name}.html` (the
//! HTML ones extend `_layout.html`). minijinja escapes by file name, so only `.html`
//! output is HTML-escaped; the subject and the text part are plain text. One loader
//! tries the override directory first, then the built-in text (`add_template` would
//! shadow the loader). Every file is compiled, and every mail rendered with sample
//! values, when the server starts: a broken override stops start-up naming its file.

use std::path::{Path, PathBuf};

use minijinja::{Environment, TemplateSource, UndefinedBehavior, Value, path_loader};

use super::{Mail, Rendered, TEMPLATE_NAMES};

macro_rules! built_in {
    ($($file:literal),* $(,)?) => {
        &[$(($file, include_str!(concat!("templates/", $file)))),*]
    };
}

/// Every built-in file, by name.
const BUILT_IN: &[(&str, &str)] = built_in![
    "_layout.html",
    "verify_email.subject.txt",
    "verify_email.txt",
    "verify_email.html",
    "signup_attempt.subject.txt",
    "signup_attempt.txt",
    "signup_attempt.html",
    "reset_password.subject.txt",
    "reset_password.txt",
    "reset_password.html",
    "password_changed.subject.txt",
    "password_changed.txt",
    "password_changed.html",
    "confirm_new_email.subject.txt",
    "confirm_new_email.txt",
    "confirm_new_email.html",
    "email_changing.subject.txt",
    "email_changing.txt",
    "email_changing.html",
    "account_deleted.subject.txt",
    "account_deleted.txt",
    "account_deleted.html",
    "new_sign_in.subject.txt",
    "new_sign_in.txt",
    "new_sign_in.html",
];

fn built_in(name: &str) -> Option<&'static str> {
    BUILT_IN.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A template that does not compile or render; `file` is the override's path, or
    /// the built-in file's name.
    #[error("mail template {file}: {reason}")]
    Broken { file: String, reason: String },
    #[error("EMAIL_TEMPLATES_DIR {dir}: {reason}")]
    Dir { dir: String, reason: String },
}

pub struct Templates {
    env: Environment<'static>,
    dir: Option<PathBuf>,
    product_name: String,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Templates {
    /// Loads, compiles and test-renders every template.
    pub fn load(dir: Option<&Path>, product_name: &str) -> Result<Self, TemplateError> {
        if let Some(dir) = dir {
            check_dir(dir)?;
        }
        let mut env = Environment::new();
        // A variable a template names but the mail does not have is an error (caught at
        // start by the sample render), not an empty string in a sent mail.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        // What start-up validated is what is used: no re-reads of changed files.
        env.set_auto_reload(false);
        let overrides = dir.map(path_loader);
        env.set_loader(move |name| {
            if let Some(load) = &overrides
                && let Some(source) = load(name)?
            {
                return Ok(Some(source));
            }
            Ok(built_in(name).map(TemplateSource::from))
        });
        let templates = Self { env, dir: dir.map(Path::to_path_buf), product_name: product_name.to_owned() };
        for (name, _) in BUILT_IN {
            templates.env.get_template(name).map_err(|e| templates.broken(name, &e))?;
        }
        for mail in Mail::samples() {
            templates.render(&mail)?;
        }
        Ok(templates)
    }

    /// The subject (one line), text and HTML of `mail`.
    pub fn render(&self, mail: &Mail) -> Result<Rendered, TemplateError> {
        let name = mail.template();
        let mut vars = mail.variables();
        vars.push(("product_name", Value::from(self.product_name.as_str())));
        let ctx = Value::from_pairs(vars);
        let render = |file: String| {
            self.env.get_template(&file).and_then(|t| t.render(&ctx)).map_err(|e| self.broken(&file, &e))
        };
        let subject = render(format!("{name}.subject.txt"))?;
        Ok(Rendered {
            // One line whatever the template holds: a header cannot take a newline.
            subject: subject.split_whitespace().collect::<Vec<_>>().join(" "),
            text: render(format!("{name}.txt"))?,
            html: render(format!("{name}.html"))?,
        })
    }

    fn broken(&self, name: &str, e: &minijinja::Error) -> TemplateError {
        // The error names the file it happened in (maybe the layout an HTML part extends).
        let name = e.name().unwrap_or(name);
        let file = match &self.dir {
            Some(dir) if dir.join(name).is_file() => dir.join(name).display().to_string(),
            _ => format!("{name} (built in)"),
        };
        let reason = match e.line() {
            Some(line) => format!("line {line}: {}", e.detail().unwrap_or(&e.kind().to_string())),
            None => e.to_string(),
        };
        TemplateError::Broken { file, reason }
    }
}

/// The override directory must exist; a file in it that overrides nothing is probably
/// misnamed, which is worth a warning.
fn check_dir(dir: &Path) -> Result<(), TemplateError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| TemplateError::Dir { dir: dir.display().to_string(), reason: e.to_string() })?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if built_in(&name).is_none() {
            tracing::warn!(
                file = %entry.path().display(),
                "EMAIL_TEMPLATES_DIR holds a file that overrides no built-in template (known: {})",
                TEMPLATE_NAMES.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Email;

    fn reset(to: &str) -> Mail {
        Mail::ResetPassword {
            to: Email::parse(to).expect("email"),
            link: "https://app.example.com/reset-password#token=abc".into(),
            expires_in: "30m".into(),
        }
    }

    #[test]
    fn every_mail_renders_with_the_built_in_templates() {
        let t = Templates::load(None, "Acme").expect("built-in templates");
        for mail in Mail::samples() {
            let r = t.render(&mail).expect("render");
            assert!(r.subject.contains("Acme") && !r.subject.contains('\n'), "{r:?}");
            assert!(r.text.contains("someone") && r.html.contains("<html"), "{r:?}");
        }
        let r = t.render(&reset("a@example.com")).expect("render");
        assert!(r.text.contains("https://app.example.com/reset-password#token=abc"), "{}", r.text);
    }

    #[test]
    fn a_hostile_product_name_is_escaped_in_html_only() {
        let hostile = r#"<script>alert("x")</script>"#;
        let t = Templates::load(None, hostile).expect("templates");
        let r = t.render(&reset("a@example.com")).expect("render");
        assert!(!r.html.contains("<script>"), "{}", r.html);
        assert!(r.html.contains("&lt;script&gt;"), "{}", r.html);
        // The text part is plain text: nothing to escape, and nothing mangled.
        assert!(r.text.contains(hostile), "{}", r.text);
        assert!(r.subject.contains(hostile), "{}", r.subject);
    }

    #[test]
    fn an_override_replaces_one_file_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("reset_password.txt"), "Custom {{ product_name }}: {{ link }}\n")
            .expect("write");
        let t = Templates::load(Some(dir.path()), "Acme").expect("templates");
        let r = t.render(&reset("a@example.com")).expect("render");
        assert_eq!(r.text.trim_end(), "Custom Acme: https://app.example.com/reset-password#token=abc");
        assert!(r.html.contains("Choose a new password"), "the built-in HTML stays: {}", r.html);
        assert!(r.subject.starts_with("Reset your Acme password"), "{}", r.subject);
    }

    #[test]
    fn a_broken_override_stops_loading_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("verify_email.html");
        std::fs::write(&path, "<p>{% if link %}unclosed</p>\n").expect("write");
        let err = Templates::load(Some(dir.path()), "Acme").expect_err("a broken override");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn an_override_naming_an_unknown_variable_stops_loading() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("account_deleted.subject.txt");
        std::fs::write(&path, "Bye {{ user_name }}").expect("write");
        let err = Templates::load(Some(dir.path()), "Acme").expect_err("an unknown variable");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn a_missing_override_dir_is_an_error() {
        let err = Templates::load(Some(Path::new("/nonexistent/latchkey-templates")), "Acme")
            .expect_err("missing dir");
        assert!(matches!(err, TemplateError::Dir { .. }), "{err}");
    }
}
