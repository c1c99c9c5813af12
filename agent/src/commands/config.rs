//! `[commands]`: which device commands the gateway may carry out, and how long it waits.
//!
//! Nothing is allowed unless an `[[commands.allow]]` entry says so. A command (from the cloud
//! or from a rule) is checked against the first entry with its name whose `devices` globs match
//! its device; every argument must be declared there, of the declared type and within range,
//! and every `required` one present.
//!
//! ```toml
//! [commands]
//! reply_timeout_ms = 30000
//!
//! [[commands.allow]]
//! name = "set_position"
//! devices = ["valve-*"]
//! args.percent = { type = "number", min = 0, max = 100, required = true }
//! args.mode = { type = "string", one_of = ["auto", "manual"] }
//! ```

use std::collections::BTreeMap;

use edgestream_protocol::limits::{
    MAX_ARG_KEY_LEN, MAX_COMMAND_ARGS, MAX_COMMAND_NAME_LEN, MAX_DEVICE_LEN,
};
use edgestream_protocol::types::{ArgValue, Command};
use serde::{Deserialize, Serialize};

use crate::validation::valid_name;
use crate::validation::Problem;

/// Most `[[commands.allow]]` entries.
pub const MAX_ALLOW_ENTRIES: usize = 256;
/// Most device globs in one entry.
pub const MAX_DEVICE_GLOBS: usize = 64;
/// Most commands accepted and not yet finished; past it new ones are rejected.
pub const MAX_PENDING_LIMIT: usize = 4096;
/// Highest `max_lifetime_ms`: 30 days.
pub const MAX_LIFETIME_LIMIT_MS: u64 = 30 * 86_400_000;
/// The reserved command name that cancels a pending command: `args.id` names it, `device`
/// must be its device, and an allow-list entry must allow `cancel` for that device.
pub const CANCEL: &str = "cancel";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsConfig {
    /// How long after a command was handed to its device the gateway waits for a final reply
    /// (`succeeded`, `failed`, `rejected`) before it reports `timed_out`; a command's own
    /// earlier `expires_at` wins.
    #[serde(default = "default_reply_timeout_ms")]
    pub reply_timeout_ms: u64,
    /// Lifetime of a command a rule issues: if it cannot reach its device within this, it is
    /// reported `timed_out` rather than carried out late.
    #[serde(default = "default_rule_command_ttl_ms")]
    pub rule_command_ttl_ms: u64,
    /// Commands accepted and not yet finished, at most.
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// The longest a command may stay pending, from its acceptance (or from a restart of the
    /// gateway, for commands accepted before it): a command whose `expires_at` is later is
    /// held to this, so that commands for a device that never becomes reachable cannot fill
    /// the pending table for good.
    #[serde(default = "default_max_lifetime_ms")]
    pub max_lifetime_ms: u64,
    /// What may be done; empty = nothing.
    #[serde(default)]
    pub allow: Vec<AllowedCommand>,
}

fn default_reply_timeout_ms() -> u64 {
    30_000
}
fn default_rule_command_ttl_ms() -> u64 {
    60_000
}
fn default_max_pending() -> usize {
    256
}
fn default_max_lifetime_ms() -> u64 {
    3_600_000
}

impl Default for CommandsConfig {
    fn default() -> Self {
        Self {
            reply_timeout_ms: default_reply_timeout_ms(),
            rule_command_ttl_ms: default_rule_command_ttl_ms(),
            max_pending: default_max_pending(),
            max_lifetime_ms: default_max_lifetime_ms(),
            allow: Vec::new(),
        }
    }
}

/// One allowed command (`[[commands.allow]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedCommand {
    pub name: String,
    /// Device name globs (`*` any run, `?` one character); default: every device.
    #[serde(default = "every_device")]
    pub devices: Vec<String>,
    /// Declared arguments; any other argument is refused.
    #[serde(default)]
    pub args: BTreeMap<String, ArgSpec>,
}

fn every_device() -> Vec<String> {
    vec!["*".into()]
}

/// One declared argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgSpec {
    #[serde(rename = "type")]
    pub kind: ArgKind,
    #[serde(default)]
    pub required: bool,
    /// Numbers only: inclusive bounds.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Strings only: the accepted values (empty = any).
    #[serde(default)]
    pub one_of: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArgKind {
    /// Any finite number.
    Number,
    /// A whole number.
    Integer,
    Bool,
    String,
}

impl ArgKind {
    fn as_str(self) -> &'static str {
        match self {
            ArgKind::Number => "a number",
            ArgKind::Integer => "an integer",
            ArgKind::Bool => "true or false",
            ArgKind::String => "a string",
        }
    }
}

fn bad(p: &mut Vec<Problem>, path: String, message: impl Into<String>) {
    p.push(Problem {
        path,
        message: message.into(),
    });
}

impl CommandsConfig {
    pub fn validate(&self, p: &mut Vec<Problem>) {
        if !(100..=86_400_000).contains(&self.reply_timeout_ms) {
            bad(
                p,
                "commands.reply_timeout_ms".into(),
                "must be between 100 and 86400000 (one day)",
            );
        }
        if !(100..=86_400_000).contains(&self.rule_command_ttl_ms) {
            bad(
                p,
                "commands.rule_command_ttl_ms".into(),
                "must be between 100 and 86400000 (one day)",
            );
        }
        if !(1_000..=MAX_LIFETIME_LIMIT_MS).contains(&self.max_lifetime_ms) {
            bad(
                p,
                "commands.max_lifetime_ms".into(),
                format!("must be between 1000 and {MAX_LIFETIME_LIMIT_MS} (30 days)"),
            );
        }
        if !(1..=MAX_PENDING_LIMIT).contains(&self.max_pending) {
            bad(
                p,
                "commands.max_pending".into(),
                format!("must be between 1 and {MAX_PENDING_LIMIT}"),
            );
        }
        if self.allow.len() > MAX_ALLOW_ENTRIES {
            bad(
                p,
                "commands.allow".into(),
                format!("at most {MAX_ALLOW_ENTRIES} entries"),
            );
        }
        for (i, a) in self.allow.iter().enumerate() {
            a.validate(&format!("commands.allow[{i}]"), p);
        }
    }
}

impl AllowedCommand {
    fn validate(&self, at: &str, p: &mut Vec<Problem>) {
        if !valid_name(&self.name, MAX_COMMAND_NAME_LEN) {
            bad(
                p,
                format!("{at}.name"),
                format!("{:?} must be 1 to {MAX_COMMAND_NAME_LEN} printable ASCII characters without spaces, '/', '+' or '#'", self.name),
            );
        }
        if self.devices.is_empty() || self.devices.len() > MAX_DEVICE_GLOBS {
            bad(
                p,
                format!("{at}.devices"),
                format!("must list 1 to {MAX_DEVICE_GLOBS} device globs"),
            );
        }
        for (j, d) in self.devices.iter().enumerate() {
            if !valid_name(d, MAX_DEVICE_LEN) {
                bad(
                    p,
                    format!("{at}.devices[{j}]"),
                    format!("{d:?} is not a valid device name or glob"),
                );
            }
        }
        if self.args.len() > MAX_COMMAND_ARGS {
            bad(
                p,
                format!("{at}.args"),
                format!("at most {MAX_COMMAND_ARGS} arguments (the wire format's limit)"),
            );
        }
        for (name, spec) in &self.args {
            let at = format!("{at}.args.{name}");
            if !valid_name(name, MAX_ARG_KEY_LEN) {
                bad(
                    p,
                    at.clone(),
                    format!("argument name must be 1 to {MAX_ARG_KEY_LEN} printable ASCII characters without spaces, '/', '+' or '#'"),
                );
            }
            let numeric = matches!(spec.kind, ArgKind::Number | ArgKind::Integer);
            if !numeric && (spec.min.is_some() || spec.max.is_some()) {
                bad(p, at.clone(), "min and max apply to numbers only");
            }
            if spec.min.is_some_and(|v| !v.is_finite()) || spec.max.is_some_and(|v| !v.is_finite())
            {
                bad(p, at.clone(), "min and max must be finite");
            }
            if let (Some(lo), Some(hi)) = (spec.min, spec.max) {
                if lo > hi {
                    bad(p, at.clone(), format!("min {lo} is above max {hi}"));
                }
            }
            if spec.kind != ArgKind::String && !spec.one_of.is_empty() {
                bad(p, at.clone(), "one_of applies to strings only");
            }
        }
    }
}

/// Why a command is refused by the allow-list. The text goes upstream in the `rejected`
/// outcome's `detail` (at most 128 bytes), so it is short and names what and where.
pub fn check(allow: &[AllowedCommand], cmd: &Command) -> Result<(), String> {
    let mut named = allow
        .iter()
        .filter(|a| a.name == cmd.name.as_str())
        .peekable();
    if named.peek().is_none() {
        return Err(format!(
            "unknown command `{}` (not in the allow-list)",
            cmd.name
        ));
    }
    let Some(entry) = named.find(|a| {
        a.devices
            .iter()
            .any(|g| edgestream_rules::glob_match(g, &cmd.device))
    }) else {
        return Err(format!(
            "command `{}` is not allowed for device `{}`",
            cmd.name, cmd.device
        ));
    };
    for (key, value) in cmd.args.iter() {
        let Some(spec) = entry.args.get(key) else {
            return Err(format!("unknown argument `{key}` for `{}`", cmd.name));
        };
        check_arg(key, value, spec)?;
    }
    for (key, spec) in &entry.args {
        if spec.required && cmd.args.get(key).is_none() {
            return Err(format!("missing required argument `{key}`"));
        }
    }
    Ok(())
}

fn check_arg(key: &str, value: &ArgValue, spec: &ArgSpec) -> Result<(), String> {
    let number = match (spec.kind, value) {
        (ArgKind::Number, ArgValue::Int(i)) => Some(*i as f64),
        (ArgKind::Number, ArgValue::Float(f)) => Some(*f),
        (ArgKind::Integer, ArgValue::Int(i)) => Some(*i as f64),
        (ArgKind::Bool, ArgValue::Bool(_)) => None,
        (ArgKind::String, ArgValue::Str(s)) => {
            if !spec.one_of.is_empty() && !spec.one_of.iter().any(|o| o == s.as_str()) {
                return Err(format!(
                    "argument `{key}` = {s:?} is not one of {:?}",
                    spec.one_of
                ));
            }
            None
        }
        (kind, v) => {
            let got = match v {
                ArgValue::Int(_) => "an integer",
                ArgValue::Float(_) => "a number with a fraction",
                ArgValue::Bool(_) => "a bool",
                ArgValue::Str(_) => "a string",
            };
            return Err(format!(
                "argument `{key}` must be {}, got {got}",
                kind.as_str()
            ));
        }
    };
    if let Some(n) = number {
        if let Some(lo) = spec.min.filter(|lo| n < *lo) {
            return Err(format!("argument `{key}` = {n} is below the minimum {lo}"));
        }
        if let Some(hi) = spec.max.filter(|hi| n > *hi) {
            return Err(format!("argument `{key}` = {n} is above the maximum {hi}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> Vec<AllowedCommand> {
        let cfg: CommandsConfig = toml::from_str(
            r#"
            [[allow]]
            name = "set_position"
            devices = ["valve-*"]
            args.percent = { type = "number", min = 0, max = 100, required = true }
            args.mode = { type = "string", one_of = ["auto", "manual"] }
            [[allow]]
            name = "reboot"
            "#,
        )
        .unwrap();
        let mut p = Vec::new();
        cfg.validate(&mut p);
        assert!(p.is_empty(), "{p:?}");
        cfg.allow
    }

    fn cmd(json: &str) -> Command {
        edgestream_protocol::json::decode_command(json.as_bytes()).unwrap()
    }

    fn with(name: &str, device: &str, args: &str) -> Command {
        cmd(&format!(
            r#"{{"v":1,"id":"c-1","device":"{device}","name":"{name}","args":{args},"issued_at":1,"expires_at":2}}"#
        ))
    }

    #[test]
    fn max_lifetime_is_bounded() {
        let problems = |ms: u64| {
            let mut p = Vec::new();
            CommandsConfig {
                max_lifetime_ms: ms,
                ..CommandsConfig::default()
            }
            .validate(&mut p);
            p.iter()
                .filter(|p| p.path == "commands.max_lifetime_ms")
                .count()
        };
        assert_eq!(problems(CommandsConfig::default().max_lifetime_ms), 0);
        assert_eq!(problems(999), 1);
        assert_eq!(problems(MAX_LIFETIME_LIMIT_MS), 0);
        assert_eq!(problems(MAX_LIFETIME_LIMIT_MS + 1), 1);
        assert_eq!(problems(u64::MAX), 1);
    }

    #[test]
    fn allowed_commands_pass() {
        let a = allow();
        assert_eq!(
            check(&a, &with("set_position", "valve-1", r#"{"percent":40}"#)),
            Ok(())
        );
        assert_eq!(
            check(
                &a,
                &with(
                    "set_position",
                    "valve-1",
                    r#"{"percent":40.5,"mode":"auto"}"#
                )
            ),
            Ok(())
        );
        assert_eq!(check(&a, &with("reboot", "anything", "{}")), Ok(()));
    }

    #[test]
    fn every_refusal_says_what() {
        let a = allow();
        let cases = [
            (
                with("open_all", "valve-1", "{}"),
                "unknown command `open_all`",
            ),
            (
                with("set_position", "pump-1", r#"{"percent":1}"#),
                "not allowed for device `pump-1`",
            ),
            (
                with("set_position", "valve-1", r#"{"percent":140}"#),
                "`percent` = 140 is above the maximum 100",
            ),
            (
                with("set_position", "valve-1", r#"{"percent":-1}"#),
                "below the minimum 0",
            ),
            (
                with("set_position", "valve-1", r#"{"percent":"high"}"#),
                "`percent` must be a number, got a string",
            ),
            (
                with("set_position", "valve-1", r#"{"percent":1,"speed":2}"#),
                "unknown argument `speed`",
            ),
            (
                with("set_position", "valve-1", r#"{"mode":"auto"}"#),
                "missing required argument `percent`",
            ),
            (
                with("set_position", "valve-1", r#"{"percent":1,"mode":"turbo"}"#),
                "is not one of",
            ),
        ];
        for (c, want) in cases {
            let got = check(&a, &c).unwrap_err();
            assert!(got.contains(want), "{got:?} should contain {want:?}");
            assert!(
                got.len() <= edgestream_protocol::limits::MAX_DETAIL_LEN,
                "{got}"
            );
        }
    }

    #[test]
    fn config_mistakes_are_reported_with_their_path() {
        let cfg: CommandsConfig = toml::from_str(
            r#"
            reply_timeout_ms = 5
            [[allow]]
            name = "bad name"
            devices = []
            args.x = { type = "bool", min = 1 }
            args.y = { type = "number", min = 5, max = 1 }
            "#,
        )
        .unwrap();
        let mut p = Vec::new();
        cfg.validate(&mut p);
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "commands.reply_timeout_ms",
                "commands.allow[0].name",
                "commands.allow[0].devices",
                "commands.allow[0].args.x",
                "commands.allow[0].args.y"
            ]
        );
    }
}
