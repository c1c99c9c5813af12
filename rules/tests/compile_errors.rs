//! Each kind of mistake gives its message at its position; a bundle with several mistakes
//! reports all of them.

use edgestream_rules::{compile, compile_with, CompileErrors, Limits};

/// Compiles `src`, expecting exactly one error at (line, col) whose message contains `needle`.
#[track_caller]
fn one_error(src: &str, line: u32, col: u32, needle: &str) {
    let errs = compile(src).expect_err("should not compile").0;
    assert_eq!(errs.len(), 1, "expected one error, got: {errs:#?}");
    let e = &errs[0];
    assert_eq!(
        (e.line, e.column),
        (line, col),
        "wrong position for {:?}",
        e.message
    );
    assert!(
        e.message.contains(needle),
        "message {:?} lacks {needle:?}",
        e.message
    );
}

#[test]
fn unknown_function() {
    one_error(
        "rule r\n  when avrg(temperature, 5m) > 70\n  alert info \"x\"",
        2,
        8,
        "unknown function `avrg`",
    );
}

#[test]
fn wrong_argument_type_window() {
    one_error(
        "rule r\n  when avg(temperature, \"5m\") > 70\n  alert info \"x\"",
        2,
        25,
        "window argument of `avg`",
    );
}

#[test]
fn wrong_argument_type_metric() {
    one_error(
        "rule r\n  when avg(3, 5m) > 70\n  alert info \"x\"",
        2,
        12,
        "first argument of `avg` must be a metric",
    );
}

#[test]
fn zscore_needs_sample_window() {
    one_error(
        "rule r\n  when zscore(v, 5m) > 4\n  alert info \"x\"",
        2,
        18,
        "window in samples",
    );
}

#[test]
fn window_too_large() {
    one_error(
        "rule r\n  when avg(t, 100000 samples) > 1\n  alert info \"x\"",
        2,
        15,
        "larger than the limit of 4096",
    );
    one_error(
        "rule r\n  when avg(t, 2d) > 1\n  alert info \"x\"",
        2,
        15,
        "longer than the limit",
    );
}

#[test]
fn wrong_arity() {
    one_error(
        "rule r\n  when rate(p, 5) > 1\n  alert info \"x\"",
        2,
        8,
        "`rate` takes 1 argument",
    );
}

#[test]
fn number_where_condition_needed() {
    one_error(
        "rule r\n  when temperature + 1\n  alert info \"x\"",
        2,
        20,
        "needs a true/false condition",
    );
}

#[test]
fn and_on_numbers() {
    one_error(
        "rule r\n  when temperature and humidity > 3\n  alert info \"x\"",
        2,
        8,
        "`and` needs a true/false condition",
    );
}

#[test]
fn unknown_severity() {
    one_error(
        "rule r\n  when t > 1\n  alert fatal \"x\"",
        3,
        9,
        "unknown severity `fatal`",
    );
}

#[test]
fn missing_action() {
    one_error("rule quiet\n  when t > 1\n", 1, 1, "has no action");
}

#[test]
fn alert_without_when() {
    one_error(
        "rule r\n  on device \"a\"\n  alert info \"x\"",
        3,
        9,
        "needs a `when`",
    );
}

#[test]
fn duplicate_rule_name() {
    one_error(
        "rule r\n  drop\nrule r\n  drop",
        3,
        1,
        "already defined at line 1",
    );
}

#[test]
fn unterminated_string() {
    one_error(
        "rule r\n  when t > 1\n  alert info \"oops\n",
        3,
        14,
        "unterminated string",
    );
}

#[test]
fn bad_duration_unit() {
    one_error(
        "rule r\n  when t > 1 for 30x\n  alert info \"x\"",
        2,
        18,
        "unknown duration unit `x`",
    );
}

#[test]
fn unexpected_character() {
    one_error(
        "rule r\n  when t > 1 $\n  alert info \"x\"",
        2,
        14,
        "unexpected character",
    );
}

#[test]
fn assignment_instead_of_comparison() {
    one_error(
        "rule r\n  when t = 1\n  alert info \"x\"",
        2,
        10,
        "compare with `==`",
    );
}

#[test]
fn keyword_as_metric() {
    one_error(
        "rule r\n  when for > 1\n  alert info \"x\"",
        2,
        8,
        "keyword `for`",
    );
}

#[test]
fn duplicate_clause() {
    one_error(
        "rule r\n  when t > 1\n  when t > 2\n  alert info \"x\"",
        3,
        3,
        "already has a `when`",
    );
}

#[test]
fn forward_mixed_with_alert() {
    one_error(
        "rule r\n  forward avg of t every 1m\n  when t > 1\n  alert info \"x\"",
        3,
        3,
        "only downsamples",
    );
}

#[test]
fn forward_unknown_aggregate() {
    one_error(
        "rule r\n  forward avg, p99 of t every 1m",
        2,
        16,
        "`p99` cannot be forwarded",
    );
}

#[test]
fn percentile_out_of_range() {
    one_error(
        "rule r\n  when percentile(t, 120, 5m) > 1\n  alert info \"x\"",
        2,
        22,
        "between 0 and 100",
    );
}

#[test]
fn ewma_alpha_out_of_range() {
    one_error(
        "rule r\n  when ewma_dev(t, 1.5) > 3\n  alert info \"x\"",
        2,
        20,
        "above 0 and at most 1",
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let src = format!(
        "rule r\n when {}t{} > 1\n alert info \"x\"",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let errs = compile(&src).expect_err("too deep").0;
    assert!(
        errs.iter().any(|e| e.message.contains("nested deeper")),
        "{errs:?}"
    );
}

#[test]
fn state_budget_exceeded() {
    let limits = Limits {
        max_state_bytes: 100_000,
        ..Limits::default()
    };
    let src = "rule r\n  when avg(t, 4096 samples) > 1\n  alert info \"x\"";
    let errs = compile_with(src, &limits).expect_err("over budget").0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].line, errs[0].column), (1, 1));
    assert!(
        errs[0].message.contains("over the limit of 100000 bytes"),
        "{}",
        errs[0].message
    );
}

#[test]
fn too_many_rules_and_too_much_source() {
    let limits = Limits {
        max_rules: 2,
        ..Limits::default()
    };
    let errs = compile_with("rule a drop\nrule b drop\nrule c drop", &limits)
        .unwrap_err()
        .0;
    assert_eq!((errs[0].line, errs[0].column), (3, 1));
    assert!(errs[0].message.contains("more than the limit of 2"));
    let limits = Limits {
        max_source_bytes: 10,
        ..Limits::default()
    };
    let errs = compile_with("rule a drop\n", &limits).unwrap_err().0;
    assert!(errs[0]
        .message
        .contains("larger than the limit of 10 bytes"));
}

#[test]
fn several_mistakes_are_all_reported_in_order() {
    let src = r#"
rule one
  when avrg(t, 5m) > 1          # unknown function
  alert critical "x"

rule two
  when t > 1 for 30x            # bad unit
  alert warning "y"

rule three
  on device "pump-*"
  when zscore(v, 10000) > 4     # window too large
  alert loud "z"                # unknown severity
"#;
    let errs: CompileErrors = compile(src).unwrap_err();
    let got: Vec<(u32, u32)> = errs.0.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(got, vec![(3, 8), (7, 18), (12, 18), (13, 9)], "{errs}");
    let text = errs.to_string();
    assert_eq!(text.lines().count(), 4);
    assert!(text.starts_with("3:8: unknown function `avrg`"), "{text}");
}

#[test]
fn canonical_and_full_language_compile() {
    let src = r#"
# every construct of the language at least once
rule overheat
  on device "boiler-*"
  when temperature > 80 for 30s
  clear when temperature < 75
  alert critical "boiler overheating"
  command set_speed(percent = 100, mode = "max", force = true) to device "fan-1"
  command set_speed(percent = 30) to device "fan-1" on clear

rule vibration
  on device "pump-?" metric "vibration"
  when zscore(vibration, 256) > 4 or mad_outlier(vibration, 128, 3.5) or ewma_dev(vibration, 0.1) > 5
  alert warning "vibration anomaly"
  tag anomaly = "vibration"
  max_devices 32

rule trends
  when avg(temperature, 5m) > 70 and not (max(temperature, 100 samples) - min(temperature, 100) > 20)
    and rate(pressure) > 0.5 and stddev(pressure, 1m) >= 0 and median(pressure, 50) != 0
    and percentile(pressure, 95, 10m) < 1e6 and sum(flow, 10) / count(flow, 10) <= abs(-3 * 2)
  alert info "trending up"

rule stuck
  when flatline(temperature, 10m) or flatline(pressure, 10m, 0.01) or missing(temperature, 2m)
  alert warning "sensor stuck or silent"

rule humidity_downsample
  on device "*"
  forward avg, min, max of humidity every 1m

rule debug_noise
  on metric "debug_*"
  drop

rule site
  tag site = "plant-3"

rule spikes
  drop when ewma(temperature, 0.5) > 1000
"#;
    let plan = compile(src).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.rule_count(), 8);
    let names: Vec<&str> = plan.rule_names().collect();
    assert_eq!(names[0], "overheat");
    // Layout and comments do not change the hash; a token does.
    let relaid = src
        .replace("\n  ", "\n      ")
        .replace("# every construct of the language at least once", "");
    assert_eq!(compile(&relaid).unwrap().hash(), plan.hash());
    assert_ne!(
        compile(&src.replace("80", "81")).unwrap().hash(),
        plan.hash()
    );
}
