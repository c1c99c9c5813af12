//! `edgestream rules check|test`: compile a rule file, or replay recorded readings through it.

use std::io::BufRead;
use std::path::Path;

use anyhow::Context;

/// Longest line accepted in a readings file.
const MAX_INPUT_LINE: usize = 64 * 1024;

fn compile_file(file: &Path) -> anyhow::Result<edgestream_rules::Plan> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read rule file {}", file.display()))?;
    edgestream_rules::compile(&text).map_err(|errors| {
        let mut msg = format!("{} error(s):", errors.0.len());
        for e in &errors.0 {
            msg.push_str(&format!(
                "\n{}:{}:{}: {}",
                file.display(),
                e.line,
                e.column,
                e.message
            ));
        }
        anyhow::anyhow!(msg)
    })
}

pub fn check(file: &Path) -> anyhow::Result<()> {
    let plan = compile_file(file)?;
    println!(
        "{}: ok, {} rule(s), state budget {} bytes, hash {:016x}",
        file.display(),
        plan.rule_count(),
        plan.state_bytes(),
        plan.hash()
    );
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InputReading {
    device: String,
    metric: String,
    value: f64,
    ts: u64,
}

pub fn test(file: &Path, input: &Path) -> anyhow::Result<()> {
    let plan = compile_file(file)?;
    let f = std::fs::File::open(input)
        .with_context(|| format!("cannot open readings file {}", input.display()))?;
    let mut readings = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}: cannot read", input.display(), i + 1))?;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if trimmed.len() > MAX_INPUT_LINE {
            anyhow::bail!(
                "{}:{}: line longer than {MAX_INPUT_LINE} bytes",
                input.display(),
                i + 1
            );
        }
        let r: InputReading = serde_json::from_str(trimmed)
            .with_context(|| format!("{}:{}: not a reading", input.display(), i + 1))?;
        readings.push(edgestream_rules::OwnedReading {
            device: r.device,
            metric: r.metric,
            value: r.value,
            ts_ms: r.ts,
        });
    }
    let n = readings.len();
    let events = edgestream_rules::replay(plan, readings);
    for e in &events {
        println!("{e}");
    }
    eprintln!("{n} reading(s) replayed, {} event(s)", events.len());
    Ok(())
}
