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

/// Fields whose values are secrets: a problem with one names the field, never its value.
const SECRET_FIELDS: [&str; 1] = ["password"];

/// Deserialises one section; a missing section is `default`, or a problem when that is `None`.
///
/// Every field with a wrong type or value is reported, not only the first: after a field
/// fails, the section is tried again without it, until it deserialises or fails for a reason
/// no single field explains (a required field missing, a field removed here among them).
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
    let mut value = value.clone();
    let mut removed: Vec<String> = Vec::new();
    loop {
        let e = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(v) if removed.is_empty() => return Some(v),
            Ok(_) => return None,
            Err(e) => e,
        };
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() {
            name.to_string()
        } else if inner.starts_with('[') {
            // An array of tables (`[[serial]]`): `serial[0].baud_rate`.
            format!("{name}{inner}")
        } else {
            format!("{name}.{inner}")
        };
        let message = e.into_inner().to_string().trim().replace('\n', " ");
        // The field this error is about, if it is one of the section's own (not nested).
        let field = (!inner.contains(['.', '['])).then_some(inner.as_str());
        let field = field.filter(|f| value.as_table().is_some_and(|t| t.contains_key(*f)));
        if removed
            .iter()
            .any(|r| message.contains(&format!("missing field `{r}`")))
        {
            return None;
        }
        let secret = SECRET_FIELDS
            .iter()
            .any(|s| inner == *s || inner.ends_with(&format!(".{s}")));
        problems.push(Problem {
            path,
            message: if secret {
                "wrong type or value (not shown: the field holds a secret)".into()
            } else {
                message
            },
        });
        match (field, value.as_table_mut()) {
            (Some(f), Some(t)) => {
                t.remove(f);
                removed.push(f.to_string());
            }
            _ => return None,
        }
    }
}

/// A section that did not deserialise, built with its failing fields replaced by
/// placeholders of their type, so that the values of its other fields can be validated too;
/// with the paths (`gateway.data_dir`) of the replaced fields, whose validation problems are
/// the placeholders' and must be dropped. `None` if no such stand-in can be built.
pub(crate) fn with_placeholders<T: DeserializeOwned>(
    table: &toml::Table,
    name: &str,
) -> Option<(T, Vec<String>)> {
    use toml::Value;
    let placeholders = || {
        [
            Value::String(String::new()),
            Value::Integer(1),
            Value::Boolean(false),
            Value::Float(1.0),
            Value::Array(Vec::new()),
            Value::Table(toml::Table::new()),
        ]
    };
    let mut value = table.get(name)?.as_table()?.clone();
    // Replaced fields and which placeholder each has now.
    let mut replaced: Vec<(String, usize)> = Vec::new();
    for _ in 0..64 {
        let e = match serde_path_to_error::deserialize::<_, T>(Value::Table(value.clone())) {
            Ok(v) => {
                let paths = replaced.into_iter().map(|(f, _)| format!("{name}.{f}"));
                return Some((v, paths.collect()));
            }
            Err(e) => e,
        };
        let inner = e.path().to_string();
        let message = e.into_inner().to_string();
        let field = if value.contains_key(&inner) {
            inner
        } else {
            message
                .strip_prefix("missing field `")?
                .split('`')
                .next()?
                .to_string()
        };
        let next = match replaced.iter_mut().find(|(f, _)| *f == field) {
            Some((_, i)) => {
                *i += 1;
                *i
            }
            None => {
                replaced.push((field.clone(), 0));
                0
            }
        };
        value.insert(field, placeholders().into_iter().nth(next)?);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        id: String,
        port: u16,
        password: Option<String>,
        count: u32,
    }

    fn problems(text: &str) -> Vec<Problem> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let mut p = Vec::new();
        assert!(section::<Section>(&table, "s", &mut p, None).is_none());
        p
    }

    #[test]
    fn every_wrong_field_is_reported_not_only_the_first() {
        let p = problems("[s]\nid = 5\nport = \"x\"\ncount = -1\n");
        let mut paths: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["s.count", "s.id", "s.port"], "{p:?}");
    }

    #[test]
    fn a_secret_field_problem_does_not_show_its_value() {
        let p = problems("[s]\nid = \"a\"\nport = 1\ncount = 1\npassword = 12345678\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].path, "s.password");
        assert!(!p[0].message.contains("12345678"), "{p:?}");
    }
}
