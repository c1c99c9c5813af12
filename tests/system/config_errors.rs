//! `edgestream check` and `edgestream run` on broken configs, as an operator sees them: every
//! problem named by its field or line and column, secrets never echoed, one clear sentence per
//! problem.

use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "hunter2-do-not-print";

fn edgestream(args: &[&str], config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edgestream"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .output()
        .expect("run edgestream")
}

/// Everything the process printed, both streams.
fn printed(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn write_config(dir: &Path, gateway: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join("edgestream.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\n{gateway}\n\n[cloud]\nhost = \"127.0.0.1\"\nport = 1\ntls = false\n{extra}"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_password_with_a_missing_quote_is_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        &format!("username = \"gw\"\npassword = \"{SECRET}\nclient_id = \"x\"\n"),
    );
    for args in [&["check"][..], &["run"][..]] {
        let out = edgestream(args, &config);
        let text = printed(&out);
        assert!(!out.status.success(), "{args:?} accepted it: {text}");
        assert!(
            !text.contains(SECRET),
            "{args:?} printed the password:\n{text}"
        );
        assert!(
            !text.contains("hunter2"),
            "{args:?} printed part of it:\n{text}"
        );
        // Where the mistake is: the field, its line and a column.
        assert!(
            text.contains("cloud.password: line 10, column"),
            "{args:?} says not where:\n{text}"
        );
    }
}

#[test]
fn a_password_of_the_wrong_type_is_named_not_shown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        "password = 98765432123\n",
    );
    let out = edgestream(&["check"], &config);
    let text = printed(&out);
    assert!(!out.status.success());
    assert!(text.contains("cloud.password"), "{text}");
    assert!(!text.contains("98765432123"), "{text}");
}

#[test]
fn every_wrong_field_of_the_gateway_table_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "id = 7\ndata_dir = 3\nshutdown_timeout_ms = \"5s\"\nworker_threads = true",
        "",
    );
    let out = edgestream(&["check"], &config);
    let text = printed(&out);
    assert!(!out.status.success());
    // A wrong value (not a wrong type) beside a wrong type is reported too.
    let config = write_config(
        dir.path(),
        "id = \"not a valid id!\"\ndata_dir = 3\nworker_threads = 0",
        "",
    );
    let out2 = edgestream(&["check"], &config);
    let text2 = printed(&out2);
    for field in ["gateway.id", "gateway.data_dir", "gateway.worker_threads"] {
        assert!(text2.contains(field), "{field} not reported:\n{text2}");
    }
    assert_eq!(text2.matches("gateway.data_dir").count(), 1, "{text2}");
    for field in [
        "gateway.id",
        "gateway.data_dir",
        "gateway.shutdown_timeout_ms",
        "gateway.worker_threads",
    ] {
        assert!(text.contains(field), "{field} not reported:\n{text}");
    }
}

#[test]
fn a_data_dir_that_cannot_be_written_fails_check_and_run_clearly() {
    // sysfs refuses new files even to root: an existing directory nobody can write.
    let unwritable = Path::new("/sys/kernel");
    assert!(unwritable.is_dir());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", unwritable.display()),
        "",
    );
    let check = edgestream(&["check"], &config);
    let text = printed(&check);
    assert!(!check.status.success(), "check said ok:\n{text}");
    assert!(
        text.contains("gateway.data_dir") && text.contains("not writable"),
        "{text}"
    );

    let run = edgestream(&["run"], &config);
    let text = printed(&run);
    assert!(!run.status.success());
    assert!(text.contains("not writable"), "{text}");
    assert!(!text.contains("outbox"), "run blames the outbox:\n{text}");
}

#[test]
fn a_data_dir_that_is_a_file_is_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, "not a directory").unwrap();
    let config = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", file.display()),
        "",
    );
    let check = edgestream(&["check"], &config);
    let text = printed(&check);
    assert!(!check.status.success(), "check said ok:\n{text}");
    assert!(text.contains("is not a directory"), "{text}");

    let run = edgestream(&["run"], &config);
    let text = printed(&run);
    assert!(!run.status.success());
    assert!(text.contains("is not a directory"), "{text}");
    assert_eq!(text.matches("os error").count(), 0, "{text}");
    assert_eq!(text.matches("not a directory").count(), 1, "{text}");
}

/// A broken Modbus register map: `check` names every problem by its field path (overlap, a
/// type its table cannot hold, an address past the end, a bit without its number, a device on
/// two slaves, a command mapped to a read-only register or to none) and says nothing about the
/// good entries.
#[test]
fn check_names_every_problem_of_a_modbus_register_map_by_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        r#"
[[modbus]]
transport = "tcp"
host = "10.0.0.5"

[[modbus.slaves]]
unit = 1
device = "meter-1"

[[modbus.slaves.registers]]
metric = "voltage"
function = "input"
address = 0
type = "f32"
word_order = "little"

[[modbus.slaves.registers]]
metric = "current"
function = "input"
address = 1
type = "f32"

[[modbus.slaves.registers]]
metric = "relay"
function = "coil"
address = 0
type = "u16"

[[modbus.slaves.registers]]
metric = "energy"
function = "holding"
address = 65534
type = "u64"

[[modbus.slaves.registers]]
metric = "alarm"
function = "holding"
address = 10
type = "bit"

[[modbus.slaves.writes]]
command = "set_voltage"
metric = "voltage"

[[modbus.slaves.writes]]
command = "set_nothing"
metric = "nothing"

[[modbus.slaves]]
unit = 2
device = "meter-1"

[[modbus.slaves.registers]]
metric = "voltage"
function = "input"
address = 0
type = "f32"
"#,
    );
    let out = edgestream(&["check"], &config);
    let text = printed(&out);
    assert!(!out.status.success(), "accepted: {text}");
    for (path, words) in [
        (
            "modbus[0].slaves[0].registers[1].address",
            "overlaps registers[0]",
        ),
        ("modbus[0].slaves[0].registers[2].type", "\"bool\""),
        (
            "modbus[0].slaves[0].registers[3].address",
            "past the last address",
        ),
        ("modbus[0].slaves[0].registers[4].bit", "needs `bit`"),
        ("modbus[0].slaves[1].device", "already modbus[0].slaves[0]"),
        ("modbus[0].slaves[0].writes[0].metric", "read only"),
        (
            "modbus[0].slaves[0].writes[1].metric",
            "not in this slave's registers",
        ),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{path}:")))
            .unwrap_or_else(|| panic!("no problem at {path}:\n{text}"));
        assert!(line.contains(words), "{path}: {line:?} lacks {words:?}");
    }
    assert!(
        !text.contains("registers[0]."),
        "the good entry is not a problem:\n{text}"
    );
    let wrong_type = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        "[[modbus]]\ntransport = \"tcp\"\nhost = \"h\"\n[[modbus.slaves]]\nunit = 1\ndevice = \"d\"\n[[modbus.slaves.registers]]\nmetric = \"m\"\nfunction = \"holding\"\naddress = 0\ntype = \"f16\"\n",
    );
    let text = printed(&edgestream(&["check"], &wrong_type));
    assert!(
        text.contains("modbus[0].slaves[0].registers[0].type") && text.contains("f16"),
        "{text}"
    );
    // Writes against the allow-list: a command nothing allows, a range the register cannot
    // hold.
    let writes = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        r#"
[[commands.allow]]
name = "set_limit"
devices = ["meter-*"]
args.value = { type = "number", min = 0, max = 70000, required = true }

[[modbus]]
transport = "tcp"
host = "h"
[[modbus.slaves]]
unit = 1
device = "meter-1"
[[modbus.slaves.registers]]
metric = "limit"
function = "holding"
address = 0
type = "u16"
[[modbus.slaves.writes]]
command = "set_limit"
metric = "limit"
[[modbus.slaves.writes]]
command = "reset"
metric = "limit"
"#,
    );
    let text = printed(&edgestream(&["check"], &writes));
    for (path, words) in [
        ("modbus[0].slaves[0].writes[0].metric", "reach 70000"),
        (
            "modbus[0].slaves[0].writes[1].command",
            "no [[commands.allow]] entry allows \"reset\"",
        ),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{path}:")))
            .unwrap_or_else(|| panic!("no problem at {path}:\n{text}"));
        assert!(line.contains(words), "{path}: {line:?} lacks {words:?}");
    }
    // RTU: a port is needed, TCP's fields are refused, 8 data bits, slave addresses 1 to 247,
    // and one port is one bus.
    let rtu = write_config(
        dir.path(),
        &format!("id = \"gw\"\ndata_dir = \"{}\"", data.display()),
        r#"
[[modbus]]
transport = "rtu"
host = "10.0.0.5"
data_bits = 7
[[modbus.slaves]]
unit = 0
device = "d"
[[modbus.slaves.registers]]
metric = "m"
function = "holding"
address = 0

[[modbus]]
transport = "rtu"
path = "/dev/ttyUSB0"
[[modbus.slaves]]
unit = 1
device = "e"
[[modbus.slaves.registers]]
metric = "m"
function = "holding"
address = 0

[[modbus]]
transport = "rtu"
path = "/dev/ttyUSB0"
[[modbus.slaves]]
unit = 1
device = "f"
[[modbus.slaves.registers]]
metric = "m"
function = "holding"
address = 0
"#,
    );
    let text = printed(&edgestream(&["check"], &rtu));
    for (path, words) in [
        ("modbus[0].path", "needs the serial port"),
        ("modbus[0].host", "only used with transport = \"tcp\""),
        ("modbus[0].data_bits", "8 data bits"),
        ("modbus[0].slaves[0].unit", "1 to 247"),
        ("modbus[2].path", "already modbus[1]"),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{path}:")))
            .unwrap_or_else(|| panic!("no problem at {path}:\n{text}"));
        assert!(line.contains(words), "{path}: {line:?} lacks {words:?}");
    }
}
