//! The write mappings of `[[modbus]]` slaves checked against the allow-list (`[commands]`):
//! a cross-section check, apart from `config.rs` because it needs the encoder of `decode.rs`
//! (which needs the config's types).

use super::config::ModbusConfig;
use super::decode::write_value;
use crate::validation::{bad, Problem};

/// Checks each write against the allow-list (`[commands]`): a command no entry allows for the
/// slave's device could never be carried out, its argument must be declared as a number, an
/// integer or a bool, and the declared range must fit the register (`min` and `max` encode).
pub(crate) fn validate_writes(
    buses: &[ModbusConfig],
    allow: &[crate::commands::config::AllowedCommand],
    p: &mut Vec<Problem>,
) {
    use crate::commands::config::ArgKind;
    for (i, bus) in buses.iter().enumerate() {
        for (j, slave) in bus.slaves.iter().enumerate() {
            for (k, w) in slave.writes.iter().enumerate() {
                let at = |f: &str| format!("modbus[{i}].slaves[{j}].writes[{k}].{f}");
                let entry = allow.iter().find(|a| {
                    a.name == w.command
                        && a.devices
                            .iter()
                            .any(|g| edgestream_rules::glob_match(g, &slave.device))
                });
                let Some(entry) = entry else {
                    bad(
                        p,
                        &at("command"),
                        format!(
                            "no [[commands.allow]] entry allows {:?} for {:?}: the write could never be carried out",
                            w.command, slave.device
                        ),
                    );
                    continue;
                };
                let Some(spec) = entry.args.get(&w.arg) else {
                    bad(
                        p,
                        &at("arg"),
                        format!(
                            "the [[commands.allow]] entry for {:?} declares no argument {:?}",
                            w.command, w.arg
                        ),
                    );
                    continue;
                };
                if spec.kind == ArgKind::String {
                    bad(
                        p,
                        &at("arg"),
                        format!(
                            "{:?} is a string argument; a register takes a number or a bool",
                            w.arg
                        ),
                    );
                    continue;
                }
                let Some(r) = slave.registers.iter().find(|r| r.metric == w.metric) else {
                    continue; // reported by the bus's own checks
                };
                for bound in [spec.min, spec.max].into_iter().flatten() {
                    if let Err(why) = write_value(r, bound) {
                        bad(
                            p,
                            &at("metric"),
                            format!(
                                "the allow-list lets {:?} reach {bound}, which {:?} cannot hold: {why}",
                                w.arg, w.metric
                            ),
                        );
                    }
                }
            }
        }
    }
}
