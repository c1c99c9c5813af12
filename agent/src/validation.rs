//! What a configuration problem is: a message and the dotted path of the field it concerns,
//! so that `edgestream check` can name every mistake at once. Each stage's section validates
//! itself with these; `config.rs` collects them.

use std::fmt;

use serde::de::DeserializeOwned;

/// One problem found in a configuration, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the field (`cloud.batch_size`), or `<toml>` for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a configuration. Never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The protocol's one naming rule (`edgestream_protocol::types::check_name`: printable ASCII
/// without spaces, '/', '+' or '#', not empty) within `max` bytes.
pub fn valid_name(s: &str, max: usize) -> bool {
    s.len() <= max && edgestream_protocol::types::check_name("name", s).is_ok()
}

pub(crate) fn bad(p: &mut Vec<Problem>, path: &str, message: impl Into<String>) {
    p.push(Problem {
        path: path.into(),
        message: message.into(),
    });
}

/// Deserialises one section; a missing section is `default`, or a problem when that is `None`.
pub(crate) fn section<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
    default: Option<T>,
) -> Option<T> {
    let Some(value) = table.get(name) else {
        if default.is_none() {
            problems.push(Problem {
                path: name.into(),
                message: "section is required".into(),
            });
        }
        return default;
    };
    match serde_path_to_error::deserialize::<_, T>(value.clone()) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let path = if inner == "." || inner.is_empty() {
                name.to_string()
            } else if inner.starts_with('[') {
                // An array of tables (`[[serial]]`): `serial[0].baud_rate`.
                format!("{name}{inner}")
            } else {
                format!("{name}.{inner}")
            };
            problems.push(Problem {
                path,
                message: e.into_inner().to_string().trim().replace('\n', " "),
            });
            None
        }
    }
}
