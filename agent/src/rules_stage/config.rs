//! The `[rules]` section: the rule file or inline text loaded at start, and the gateway group
//! whose rule bundles this gateway also takes.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::validation::{bad, Problem};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// Rule file loaded at start.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Inline rules, for small setups.
    #[serde(default)]
    pub text: Option<String>,
    /// Also take rule bundles for this group of gateways, on
    /// `{prefix}/groups/{group}/rules/set`.
    #[serde(default)]
    pub group: Option<String>,
    /// How far ahead of the gateway's clock a reading's timestamp may be, in milliseconds;
    /// a reading stamped further ahead is rejected (counted, dead-lettered). 0: no limit.
    #[serde(default = "default_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
}

/// Five minutes: far beyond the drift of a device whose clock is set at all, and short
/// enough that a wrong clock is noticed within one look at the counters.
pub const DEFAULT_MAX_CLOCK_SKEW_MS: u64 = 300_000;

fn default_max_clock_skew_ms() -> u64 {
    DEFAULT_MAX_CLOCK_SKEW_MS
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            file: None,
            text: None,
            group: None,
            max_clock_skew_ms: DEFAULT_MAX_CLOCK_SKEW_MS,
        }
    }
}

impl RulesConfig {
    /// The rule text and where it came from (`rules.file (path)` or `rules.text`).
    pub fn source(&self, base: Option<&Path>) -> Result<Option<(String, String)>, Problem> {
        if let Some(text) = &self.text {
            return Ok(Some(("rules.text".into(), text.clone())));
        }
        let Some(file) = &self.file else {
            return Ok(None);
        };
        let path = match base {
            Some(b) if file.is_relative() => b.join(file),
            _ => file.clone(),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some((format!("rules.file ({})", path.display()), text))),
            Err(e) => Err(Problem {
                path: "rules.file".into(),
                message: format!("cannot read {}: {e}", path.display()),
            }),
        }
    }
}

impl RulesConfig {
    pub(crate) fn validate(&self, base: Option<&Path>, p: &mut Vec<Problem>) {
        if self.file.is_some() && self.text.is_some() {
            bad(p, "rules", "give either `file` or `text`, not both");
        }
        if let Some(g) = &self.group {
            if g.is_empty()
                || !g
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                bad(
                    p,
                    "rules.group",
                    format!("{g:?} may contain only letters, digits, '-' and '_'"),
                );
            }
        }
        match self.source(base) {
            Ok(Some((origin, text))) => {
                if let Err(errors) = edgestream_rules::compile(&text) {
                    for e in errors.0 {
                        bad(
                            p,
                            &origin,
                            format!("line {}, column {}: {}", e.line, e.column, e.message),
                        );
                    }
                }
            }
            Ok(None) => {}
            Err(problem) => p.push(problem),
        }
    }
}
