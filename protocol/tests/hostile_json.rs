//! The command and bundle decoders on hostile input: arbitrary bytes, and JSON-like text
//! built from the pieces a real payload is made of (so that most cases get past the syntax
//! check and reach the field checks). Each decoder must return, never panic, and a refusal
//! must say why in a few words. The fuzz target `json_payloads` goes further (coverage-guided,
//! round trips); this runs with `cargo test`.

use edgestream_protocol::json;
use proptest::prelude::*;

/// A JSON-ish fragment: keys and values a command or bundle has, in any order and nesting,
/// with wrong types, huge numbers, odd strings and broken punctuation mixed in.
fn json_ish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("\"v\":1".to_string()),
        Just("\"v\":2".to_string()),
        Just("\"id\":\"c-1\"".to_string()),
        Just("\"device\":\"valve-1\"".to_string()),
        Just("\"name\":\"set_position\"".to_string()),
        Just("\"args\":{\"percent\":40}".to_string()),
        Just("\"args\":[1,2]".to_string()),
        Just("\"issued_at\":0".to_string()),
        Just("\"expires_at\":18446744073709551615".to_string()),
        Just("\"expires_at\":1e400".to_string()),
        Just("\"version\":7".to_string()),
        Just(
            "\"rules\":\"rule r on device \\\"*\\\" when t > 1 alert info \\\"x\\\"\"".to_string()
        ),
        Just("\"rollback\":true".to_string()),
        Just("\"meta\":{}".to_string()),
        "\"[a-z_]{0,12}\":(null|true|-?[0-9]{1,25}|\"[^\"\\\\]{0,20}\")",
        "[{}\\[\\],:\" ]{0,3}",
    ];
    prop::collection::vec(atom, 0..12).prop_map(|parts| format!("{{{}}}", parts.join(",")))
}

fn check(payload: &[u8]) -> Result<(), TestCaseError> {
    if let Err(e) = json::decode_command(payload) {
        let why = e.to_string();
        prop_assert!(!why.is_empty() && why.len() <= 200, "{why:?}");
    }
    if let Err(e) = json::decode_bundle(payload) {
        let why = e.to_string();
        prop_assert!(!why.is_empty() && why.len() <= 200, "{why:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_refusals_say_why(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check(&bytes)?;
    }

    #[test]
    fn json_like_text_never_panics_and_refusals_say_why(text in json_ish()) {
        check(text.as_bytes())?;
    }
}
