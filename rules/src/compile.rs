//! Compiler: syntax tree to a validated, size-bounded [`Plan`].
//!
//! Every check happens here, before a plan can exist: names, types, argument kinds, window
//! sizes, per-rule bounds and the bundle's worst-case state memory. A `Plan` therefore never
//! fails at run time; the engine only evaluates it. All problems are collected and returned
//! together, sorted by position.

use std::collections::HashMap;
use std::sync::Arc;

use edgestream_protocol::limits::{MAX_DEVICE_LEN, MAX_METRIC_LEN};

use crate::engine::slot_bytes;
use crate::error::{CompileError, CompileErrors, Pos};
use crate::lexer::{lex, Token};
use crate::limits::*;
use crate::output::{AggFunctions, ArgValue, DeviceName, MetricName, Severity};
use crate::parser::{ArgLit, BinOp, Expr, Parser, RuleAst, UnOp};
use crate::plan::{
    AggFn, CommandSpec, DetKind, DetSpec, ForwardSpec, Node, Plan, PlanInner, RulePlan, WindowSpec,
};

/// Fuses `metric OP constant` comparisons, everywhere in the tree.
fn fuse(node: Node) -> Node {
    match node {
        Node::Bin(op, a, b) => match (op, *a, *b) {
            (
                BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge | BinOp::Eq | BinOp::Ne,
                Node::Latest(i),
                Node::Const(c),
            ) => Node::CmpLatest(op, i, c),
            (op, a, b) => Node::Bin(op, Box::new(fuse(a)), Box::new(fuse(b))),
        },
        Node::Neg(a) => Node::Neg(Box::new(fuse(*a))),
        Node::Not(a) => Node::Not(Box::new(fuse(*a))),
        Node::Abs(a) => Node::Abs(Box::new(fuse(*a))),
        other => other,
    }
}

/// FNV-1a, 64 bit: tiny, stable across platforms, good enough for change detection.
fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn hash_tokens(toks: &[Token<'_>]) -> u64 {
    let mut h = FNV_OFFSET;
    for (i, t) in toks.iter().enumerate() {
        if i > 0 {
            h = fnv1a(h, b" ");
        }
        h = fnv1a(h, t.text.as_bytes());
    }
    h
}

/// Compiles `src` under [`Limits::default`].
pub fn compile(src: &str) -> Result<Plan, CompileErrors> {
    compile_with(src, &Limits::default())
}

/// Compiles `src`, returning every problem found if there is any.
pub fn compile_with(src: &str, limits: &Limits) -> Result<Plan, CompileErrors> {
    if src.len() > limits.max_source_bytes {
        return Err(CompileErrors(vec![CompileError::new(
            Pos { line: 1, col: 1 },
            format!(
                "bundle of {} bytes is larger than the limit of {} bytes",
                src.len(),
                limits.max_source_bytes
            ),
        )]));
    }
    let mut errors = Vec::new();
    let toks = lex(src, &mut errors);
    let mut parser = Parser::new(&toks);
    let asts = parser.bundle();
    errors.append(&mut parser.errors);

    let mut rules = Vec::with_capacity(asts.len());
    let mut names: HashMap<&str, Pos> = HashMap::new();
    let mut state_bytes = 0usize;
    let mut budget_reported = false;
    for (n, ast) in asts.iter().enumerate() {
        if n == limits.max_rules {
            errors.push(CompileError::new(
                ast.pos,
                format!(
                    "bundle has {} rules, more than the limit of {}",
                    asts.len(),
                    limits.max_rules
                ),
            ));
        }
        if !ast.name.is_empty() {
            if let Some(prev) = names.get(ast.name) {
                errors.push(CompileError::new(
                    ast.pos,
                    format!(
                        "rule `{}` is already defined at line {}",
                        ast.name, prev.line
                    ),
                ));
            } else {
                names.insert(ast.name, ast.pos);
            }
        }
        let fingerprint = hash_tokens(&toks[ast.tokens.0..ast.tokens.1]);
        if let Some(rule) = RuleCompiler::new(limits, &mut errors).rule(ast, fingerprint) {
            state_bytes =
                state_bytes.saturating_add(rule.slot_bytes.saturating_mul(rule.max_devices));
            if state_bytes > limits.max_state_bytes && !budget_reported {
                budget_reported = true;
                errors.push(CompileError::new(
                    ast.pos,
                    format!(
                        "rule `{}` takes the bundle's worst-case state to {} bytes, over the limit of {} bytes: use smaller windows or a lower `max_devices`",
                        ast.name, state_bytes, limits.max_state_bytes
                    ),
                ));
            }
            rules.push(rule);
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line, e.column));
        errors.dedup();
        return Err(CompileErrors(errors));
    }
    let hash = hash_tokens(&toks[..toks.len() - 1]);
    Ok(Plan {
        inner: Arc::new(PlanInner {
            rules,
            limits: limits.clone(),
            hash,
            state_bytes,
        }),
    })
}

struct RuleCompiler<'l, 'e, 'a> {
    limits: &'l Limits,
    errors: &'e mut Vec<CompileError>,
    inputs: Vec<&'a str>,
    dets: Vec<DetSpec>,
    nodes: usize,
    ok: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    Num,
    Bool,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Num => "a number",
            Ty::Bool => "a true/false condition",
        }
    }
}

/// What the window argument of a function turned out to be.
enum Window {
    Samples(usize),
    Time(u64),
}

impl<'l, 'e, 'a> RuleCompiler<'l, 'e, 'a> {
    fn new(limits: &'l Limits, errors: &'e mut Vec<CompileError>) -> Self {
        RuleCompiler {
            limits,
            errors,
            inputs: Vec::new(),
            dets: Vec::new(),
            nodes: 0,
            ok: true,
        }
    }

    fn error(&mut self, pos: Pos, msg: impl Into<String>) {
        self.ok = false;
        self.errors.push(CompileError::new(pos, msg));
    }

    fn rule(mut self, ast: &RuleAst<'a>, fingerprint: u64) -> Option<RulePlan> {
        if ast.broken {
            self.ok = false;
        }
        if ast.name.len() > MAX_RULE_NAME_LEN {
            self.error(
                ast.pos,
                format!("rule name is longer than {MAX_RULE_NAME_LEN} bytes"),
            );
        }
        let device = match &ast.device {
            Some(d) => {
                if d.value.is_empty() || d.value.len() > MAX_DEVICE_LEN {
                    self.error(
                        d.pos,
                        format!("device pattern must be 1 to {MAX_DEVICE_LEN} bytes"),
                    );
                }
                d.value.clone()
            }
            None => "*".into(),
        };
        if let Some(m) = &ast.metric {
            if m.value.is_empty() || m.value.len() > MAX_METRIC_LEN {
                self.error(
                    m.pos,
                    format!("metric pattern must be 1 to {MAX_METRIC_LEN} bytes"),
                );
            }
        }
        let has_action = ast.alert.is_some()
            || !ast.commands.is_empty()
            || ast.forward.is_some()
            || ast.drop.is_some()
            || !ast.tags.is_empty();
        if !has_action && !ast.broken {
            self.error(
                ast.pos,
                format!(
                    "rule `{}` has no action: add alert, command, forward, drop or tag",
                    ast.name
                ),
            );
        }

        let when = ast
            .when
            .as_ref()
            .and_then(|c| self.condition(&c.expr, "when"));
        let clear = ast
            .clear
            .as_ref()
            .and_then(|c| self.condition(&c.expr, "clear when"));
        let for_ms = ast
            .when
            .as_ref()
            .and_then(|c| c.for_ms.as_ref())
            .map(|d| self.duration(d.value, d.pos))
            .unwrap_or(0);
        let clear_for_ms = ast
            .clear
            .as_ref()
            .and_then(|c| c.for_ms.as_ref())
            .map(|d| self.duration(d.value, d.pos))
            .unwrap_or(0);
        if let Some(c) = &ast.clear {
            if ast.when.is_none() && !ast.broken {
                self.error(c.pos, "`clear when` needs a `when` condition to clear");
            }
        }

        let alert = match &ast.alert {
            Some((sev, msg)) => match Severity::parse(sev.value) {
                Some(s) => {
                    if msg.len() > MAX_ALERT_MESSAGE_LEN {
                        self.error(
                            sev.pos,
                            format!("alert message is longer than {MAX_ALERT_MESSAGE_LEN} bytes"),
                        );
                    }
                    if ast.when.is_none() && !ast.broken {
                        self.error(
                            sev.pos,
                            "`alert` needs a `when` condition saying when to raise it",
                        );
                    }
                    Some((s, Arc::<str>::from(&**msg)))
                }
                None => {
                    self.error(
                        sev.pos,
                        format!(
                            "unknown severity `{}`: use info, warning or critical",
                            sev.value
                        ),
                    );
                    None
                }
            },
            None => None,
        };

        let mut commands = Vec::new();
        if ast.commands.len() > MAX_COMMANDS_PER_RULE {
            self.error(
                ast.commands[MAX_COMMANDS_PER_RULE].name.pos,
                format!("more than {MAX_COMMANDS_PER_RULE} commands in one rule"),
            );
        }
        for c in &ast.commands {
            if ast.when.is_none() && !ast.broken {
                self.error(
                    c.name.pos,
                    "`command` needs a `when` condition saying when to send it",
                );
            }
            if c.args.len() > MAX_COMMAND_ARGS {
                self.error(
                    c.name.pos,
                    format!("more than {MAX_COMMAND_ARGS} command arguments"),
                );
            }
            if c.name.value.len() > MAX_COMMAND_NAME_LEN {
                self.error(
                    c.name.pos,
                    format!("command name is longer than {MAX_COMMAND_NAME_LEN} bytes"),
                );
            }
            let mut args: Vec<(Arc<str>, ArgValue)> = Vec::new();
            for (k, v) in &c.args {
                if args.iter().any(|(a, _)| &**a == k.value) {
                    self.error(k.pos, format!("argument `{}` is given twice", k.value));
                }
                if k.value.len() > MAX_ARG_KEY_LEN {
                    self.error(
                        k.pos,
                        format!("argument name is longer than {MAX_ARG_KEY_LEN} bytes"),
                    );
                }
                if let ArgLit::Text(t) = v {
                    if t.len() > MAX_ARG_STR_LEN {
                        self.error(
                            k.pos,
                            format!("text argument is longer than {MAX_ARG_STR_LEN} bytes"),
                        );
                    }
                }
                let v = match v {
                    ArgLit::Number(n) => ArgValue::Number(*n),
                    ArgLit::Bool(b) => ArgValue::Bool(*b),
                    ArgLit::Text(t) => ArgValue::Text(Arc::from(&**t)),
                };
                args.push((Arc::from(k.value), v));
            }
            let target = match &c.target {
                Some(t) => match DeviceName::try_from(&*t.value) {
                    Ok(d) if !d.is_empty() && !d.contains(['*', '?']) => Some(d),
                    _ => {
                        self.error(t.pos, format!("target device must be one device name of 1 to {MAX_DEVICE_LEN} bytes, without wildcards"));
                        None
                    }
                },
                None => None,
            };
            commands.push(CommandSpec {
                name: Arc::from(c.name.value),
                args: args.into(),
                target,
                on_clear: c.on_clear,
            });
        }

        let mut tags = Vec::new();
        if ast.tags.len() > MAX_TAGS {
            self.error(
                ast.tags[MAX_TAGS].0.pos,
                format!("more than {MAX_TAGS} tags in one rule"),
            );
        }
        for (k, v) in &ast.tags {
            if k.value.len() > MAX_TAG_KEY_LEN || v.len() > MAX_TAG_VALUE_LEN {
                self.error(k.pos, format!("tag names are at most {MAX_TAG_KEY_LEN} bytes and values at most {MAX_TAG_VALUE_LEN}"));
            }
            tags.push((Arc::<str>::from(k.value), Arc::<str>::from(&**v)));
        }

        let mut forward = None;
        if let Some(f) = &ast.forward {
            let mut functions = AggFunctions::default();
            for func in &f.functions {
                match AggFunctions::parse(func.value) {
                    Some(a) => functions.0 |= a.0,
                    None => self.error(
                        func.pos,
                        format!(
                            "`{}` cannot be forwarded: use avg, min, max, sum, count or last",
                            func.value
                        ),
                    ),
                }
            }
            let every_ms = self.duration(f.every.value, f.every.pos);
            if f.metric.value.len() > MAX_METRIC_LEN {
                self.error(
                    f.metric.pos,
                    format!("metric name is longer than {MAX_METRIC_LEN} bytes"),
                );
            }
            let conflict = ast
                .when
                .as_ref()
                .map(|w| (w.pos, "when"))
                .or(ast.alert.as_ref().map(|a| (a.0.pos, "alert")))
                .or(ast.commands.first().map(|c| (c.name.pos, "command")))
                .or(ast.drop.map(|p| (p, "drop")))
                .or(ast.tags.first().map(|t| (t.0.pos, "tag")))
                .or(ast.metric.as_ref().map(|m| (m.pos, "on metric")));
            if let Some((pos, what)) = conflict {
                self.error(pos, format!("a `forward` rule only downsamples its metric; put `{what}` in a separate rule"));
            }
            let input = self.input(f.metric.value, f.metric.pos);
            forward = Some(ForwardSpec {
                functions,
                input,
                metric: MetricName::try_from(f.metric.value).unwrap_or_default(),
                every_ms,
            });
        }

        let max_devices = match &ast.max_devices {
            Some(m) => {
                if m.value == 0 || m.value > MAX_DEVICES_PER_RULE_CEILING as u64 {
                    self.error(
                        m.pos,
                        format!("max_devices must be between 1 and {MAX_DEVICES_PER_RULE_CEILING}"),
                    );
                }
                m.value as usize
            }
            None => self.limits.default_max_devices,
        };

        if !self.ok {
            return None;
        }
        let needs_tick = for_ms > 0
            || clear_for_ms > 0
            || forward.is_some()
            || self
                .dets
                .iter()
                .any(|d| d.window.horizon_ms > 0 || matches!(d.kind, DetKind::Missing { .. }));
        let slot_bytes = slot_bytes(self.inputs.len(), &self.dets, forward.is_some());
        Some(RulePlan {
            name: Arc::from(ast.name),
            device,
            metric: ast.metric.as_ref().map(|m| m.value.clone()),
            inputs: self.inputs.iter().map(|s| Box::<str>::from(*s)).collect(),
            dets: self.dets,
            when,
            for_ms,
            clear,
            clear_for_ms,
            alert,
            commands,
            tags,
            drop: ast.drop.is_some(),
            forward,
            max_devices,
            slot_bytes,
            fingerprint,
            needs_tick,
        })
    }

    fn duration(&mut self, ms: u64, pos: Pos) -> u64 {
        if ms == 0 {
            self.error(pos, "duration must be longer than zero");
        } else if ms > self.limits.max_window_ms {
            self.error(
                pos,
                format!(
                    "duration of {ms} ms is longer than the limit of {} ms",
                    self.limits.max_window_ms
                ),
            );
        }
        ms
    }

    fn condition(&mut self, e: &Expr<'a>, clause: &str) -> Option<Node> {
        let (node, ty) = self.expr(e)?;
        if ty != Ty::Bool {
            self.error(
                e.pos(),
                format!("`{clause}` needs a true/false condition such as `temperature > 80`, but this is a number"),
            );
            return None;
        }
        Some(fuse(node))
    }

    fn input(&mut self, metric: &'a str, pos: Pos) -> u8 {
        if let Some(i) = self.inputs.iter().position(|m| *m == metric) {
            return i as u8;
        }
        if metric.len() > MAX_METRIC_LEN {
            self.error(
                pos,
                format!("metric name `{metric}` is longer than {MAX_METRIC_LEN} bytes"),
            );
        }
        if self.inputs.len() == MAX_METRICS_PER_RULE {
            self.error(
                pos,
                format!("rule names more than {MAX_METRICS_PER_RULE} metrics"),
            );
            return 0;
        }
        self.inputs.push(metric);
        (self.inputs.len() - 1) as u8
    }

    fn detector(&mut self, spec: DetSpec, pos: Pos) -> Node {
        // Identical calls share one detector (and one ring buffer).
        if let Some(i) = self.dets.iter().position(|d| *d == spec) {
            return Node::Det(i as u8);
        }
        // Aggregates over the same metric and window share one ring, which keeps what each
        // of them needs (a sorted copy for order statistics, the values unless all count).
        if let DetKind::Agg(f) = spec.kind {
            let same_window = |d: &DetSpec| {
                matches!(d.kind, DetKind::Agg(_))
                    && d.input == spec.input
                    && d.window.cap == spec.window.cap
                    && d.window.horizon_ms == spec.window.horizon_ms
            };
            if let Some(i) = self.dets.iter().position(same_window) {
                let w = &mut self.dets[i].window;
                w.sorted |= spec.window.sorted;
                w.values |= spec.window.values;
                return Node::AggOf(i as u8, f);
            }
        }
        if self.dets.len() == MAX_DETECTORS_PER_RULE {
            self.error(
                pos,
                format!(
                    "rule uses more than {MAX_DETECTORS_PER_RULE} window functions and detectors"
                ),
            );
            return Node::Const(f64::NAN);
        }
        self.dets.push(spec);
        Node::Det((self.dets.len() - 1) as u8)
    }

    fn expr(&mut self, e: &Expr<'a>) -> Option<(Node, Ty)> {
        self.nodes += 1;
        if self.nodes == MAX_EXPR_OPS + 1 {
            self.error(
                e.pos(),
                format!("rule's expressions have more than {MAX_EXPR_OPS} operations"),
            );
        }
        match e {
            Expr::Num(v, _, _) => Some((Node::Const(*v), Ty::Num)),
            Expr::Bool(b, _) => Some((Node::Const(if *b { 1.0 } else { 0.0 }), Ty::Bool)),
            Expr::Metric(m, pos) => Some((Node::Latest(self.input(m, *pos)), Ty::Num)),
            Expr::Dur(_, pos) => {
                self.error(
                    *pos,
                    "a duration is only allowed as a window argument or after `for`",
                );
                None
            }
            Expr::Samples(_, pos) => {
                self.error(*pos, "`N samples` is only allowed as a window argument");
                None
            }
            Expr::Str(pos) => {
                self.error(
                    *pos,
                    "a string is not a value in an expression; metric names are written bare",
                );
                None
            }
            Expr::Unary(op, inner, pos) => {
                let (n, ty) = self.expr(inner)?;
                match op {
                    UnOp::Neg => {
                        self.want(ty, Ty::Num, *pos, "`-`")?;
                        Some((Node::Neg(Box::new(n)), Ty::Num))
                    }
                    UnOp::Not => {
                        self.want(ty, Ty::Bool, *pos, "`not`")?;
                        Some((Node::Not(Box::new(n)), Ty::Bool))
                    }
                }
            }
            Expr::Binary(op, l, r, _) => {
                let lhs = self.expr(l);
                let rhs = self.expr(r);
                let ((ln, lt), (rn, rt)) = (lhs?, rhs?);
                let (operand, result, sym) = match op {
                    BinOp::Add => (Ty::Num, Ty::Num, "`+`"),
                    BinOp::Sub => (Ty::Num, Ty::Num, "`-`"),
                    BinOp::Mul => (Ty::Num, Ty::Num, "`*`"),
                    BinOp::Div => (Ty::Num, Ty::Num, "`/`"),
                    BinOp::Lt => (Ty::Num, Ty::Bool, "`<`"),
                    BinOp::Le => (Ty::Num, Ty::Bool, "`<=`"),
                    BinOp::Gt => (Ty::Num, Ty::Bool, "`>`"),
                    BinOp::Ge => (Ty::Num, Ty::Bool, "`>=`"),
                    BinOp::Eq => (Ty::Num, Ty::Bool, "`==`"),
                    BinOp::Ne => (Ty::Num, Ty::Bool, "`!=`"),
                    BinOp::And => (Ty::Bool, Ty::Bool, "`and`"),
                    BinOp::Or => (Ty::Bool, Ty::Bool, "`or`"),
                };
                let a = self.want(lt, operand, l.pos(), sym);
                let b = self.want(rt, operand, r.pos(), sym);
                a?;
                b?;
                Some((Node::Bin(*op, Box::new(ln), Box::new(rn)), result))
            }
            Expr::Call { name, args, pos } => self.call(name, args, *pos),
        }
    }

    fn want(&mut self, got: Ty, want: Ty, pos: Pos, op: &str) -> Option<()> {
        if got == want {
            Some(())
        } else {
            self.error(
                pos,
                format!(
                    "{op} needs {} here, but this is {}",
                    want.name(),
                    got.name()
                ),
            );
            None
        }
    }

    fn metric_arg(&mut self, name: &str, args: &[Expr<'a>], pos: Pos) -> Option<u8> {
        match args.first() {
            Some(Expr::Metric(m, mpos)) => Some(self.input(m, *mpos)),
            Some(other) => {
                self.error(other.pos(), format!("first argument of `{name}` must be a metric name, e.g. `{name}(temperature, ...)`"));
                None
            }
            None => {
                self.error(
                    pos,
                    format!("`{name}` needs a metric as its first argument"),
                );
                None
            }
        }
    }

    fn arity(
        &mut self,
        name: &str,
        args: &[Expr<'a>],
        pos: Pos,
        min: usize,
        max: usize,
        usage: &str,
    ) -> Option<()> {
        if args.len() < min || args.len() > max {
            self.error(
                pos,
                format!(
                    "`{name}` takes {} argument{}: {usage}",
                    if min == max {
                        min.to_string()
                    } else {
                        format!("{min} or {max}")
                    },
                    if max == 1 { "" } else { "s" }
                ),
            );
            return None;
        }
        Some(())
    }

    fn window_arg(&mut self, name: &str, arg: &Expr<'a>) -> Option<Window> {
        match arg {
            Expr::Samples(_, pos) | Expr::Num(_, true, pos) => {
                let n = match arg {
                    Expr::Samples(n, _) => *n,
                    Expr::Num(v, _, _) => *v as u64,
                    _ => 0,
                };
                if n == 0 {
                    self.error(*pos, "a window needs at least 1 sample");
                    None
                } else if n > self.limits.max_window_samples as u64 {
                    self.error(
                        *pos,
                        format!(
                            "window of {n} samples is larger than the limit of {}",
                            self.limits.max_window_samples
                        ),
                    );
                    None
                } else {
                    Some(Window::Samples(n as usize))
                }
            }
            Expr::Dur(ms, pos) => {
                let ms = self.duration(*ms, *pos);
                if ms > self.limits.max_window_ms || ms == 0 {
                    None
                } else {
                    Some(Window::Time(ms))
                }
            }
            other => {
                self.error(
                    other.pos(),
                    format!("window argument of `{name}` must be a sample count (`100` or `100 samples`) or a duration (`5m`)"),
                );
                None
            }
        }
    }

    fn const_num(
        &mut self,
        name: &str,
        what: &str,
        arg: &Expr<'a>,
        lo: f64,
        hi: f64,
        lo_open: bool,
    ) -> Option<f64> {
        let v = match arg {
            Expr::Num(v, _, _) => *v,
            Expr::Unary(UnOp::Neg, inner, _) if matches!(**inner, Expr::Num(..)) => match **inner {
                Expr::Num(v, _, _) => -v,
                _ => f64::NAN,
            },
            other => {
                self.error(
                    other.pos(),
                    format!("{what} of `{name}` must be a number written in the rule"),
                );
                return None;
            }
        };
        let below = if lo_open { v <= lo } else { v < lo };
        if below || v > hi {
            let range = if lo_open {
                format!("above {lo} and at most {hi}")
            } else {
                format!("between {lo} and {hi}")
            };
            self.error(
                arg.pos(),
                format!("{what} of `{name}` must be {range}, not {v}"),
            );
            return None;
        }
        Some(v)
    }

    fn call(&mut self, name: &str, args: &[Expr<'a>], pos: Pos) -> Option<(Node, Ty)> {
        let agg = match name {
            "avg" => Some(AggFn::Avg),
            "min" => Some(AggFn::Min),
            "max" => Some(AggFn::Max),
            "sum" => Some(AggFn::Sum),
            "count" => Some(AggFn::Count),
            "stddev" => Some(AggFn::Stddev),
            "median" => Some(AggFn::Quantile(0.5)),
            _ => None,
        };
        if let Some(f) = agg {
            self.arity(
                name,
                args,
                pos,
                2,
                2,
                &format!("a metric and a window, e.g. `{name}(temperature, 5m)`"),
            )?;
            let input = self.metric_arg(name, args, pos);
            let w = self.window_arg(name, &args[1]);
            let (input, w) = (input?, w?);
            // Order statistics (min, max, quantiles) read a sorted copy: O(1) instead of a scan.
            let sorted = matches!(f, AggFn::Quantile(_) | AggFn::Min | AggFn::Max);
            let window = self.window_spec(w, sorted, f != AggFn::Count);
            let node = self.detector(
                DetSpec {
                    kind: DetKind::Agg(f),
                    input,
                    window,
                },
                pos,
            );
            return Some((node, Ty::Num));
        }
        match name {
            "percentile" => {
                self.arity(
                    name,
                    args,
                    pos,
                    3,
                    3,
                    "a metric, a percentile and a window, e.g. `percentile(latency, 95, 5m)`",
                )?;
                let input = self.metric_arg(name, args, pos);
                let p = self.const_num(name, "the percentile", &args[1], 0.0, 100.0, false);
                let w = self.window_arg(name, &args[2]);
                let (input, p, w) = (input?, p?, w?);
                let window = self.window_spec(w, true, true);
                let node = self.detector(
                    DetSpec {
                        kind: DetKind::Agg(AggFn::Quantile(p / 100.0)),
                        input,
                        window,
                    },
                    pos,
                );
                Some((node, Ty::Num))
            }
            "zscore" | "mad_score" | "mad_outlier" => {
                let (min, max, usage) = if name == "mad_outlier" {
                    (3, 3, "a metric, a window in samples and a threshold, e.g. `mad_outlier(vibration, 128, 3.5)`")
                } else {
                    (
                        2,
                        2,
                        "a metric and a window in samples, e.g. `zscore(vibration, 256)`",
                    )
                };
                self.arity(name, args, pos, min, max, usage)?;
                let input = self.metric_arg(name, args, pos);
                let w = self.window_arg(name, &args[1]);
                let k = if name == "mad_outlier" {
                    self.const_num(name, "the threshold", &args[2], 0.0, f64::MAX, true)
                } else {
                    Some(0.0)
                };
                let (input, w, k) = (input?, w?, k?);
                let n = match w {
                    Window::Samples(n) if n >= 2 => n,
                    Window::Samples(_) => {
                        self.error(
                            args[1].pos(),
                            format!("`{name}` needs a window of at least 2 samples"),
                        );
                        return None;
                    }
                    Window::Time(_) => {
                        self.error(
                            args[1].pos(),
                            format!(
                                "`{name}` needs a window in samples (e.g. `256`), not a duration"
                            ),
                        );
                        return None;
                    }
                };
                let mad = name != "zscore";
                let kind = if mad {
                    DetKind::MadScore
                } else {
                    DetKind::ZScore
                };
                let window = WindowSpec {
                    cap: n,
                    horizon_ms: 0,
                    sorted: mad,
                    values: true,
                };
                let node = self.detector(
                    DetSpec {
                        kind,
                        input,
                        window,
                    },
                    pos,
                );
                if name == "mad_outlier" {
                    return Some((
                        Node::Bin(BinOp::Gt, Box::new(node), Box::new(Node::Const(k))),
                        Ty::Bool,
                    ));
                }
                Some((node, Ty::Num))
            }
            "ewma" | "ewma_dev" => {
                self.arity(
                    name,
                    args,
                    pos,
                    2,
                    2,
                    &format!("a metric and a smoothing factor, e.g. `{name}(temperature, 0.1)`"),
                )?;
                let input = self.metric_arg(name, args, pos);
                let alpha = self.const_num(name, "the smoothing factor", &args[1], 0.0, 1.0, true);
                let (input, alpha) = (input?, alpha?);
                let kind = if name == "ewma" {
                    DetKind::Ewma { alpha }
                } else {
                    DetKind::EwmaDev { alpha }
                };
                let node = self.detector(
                    DetSpec {
                        kind,
                        input,
                        window: NO_WINDOW,
                    },
                    pos,
                );
                Some((node, Ty::Num))
            }
            "rate" => {
                self.arity(name, args, pos, 1, 1, "a metric, e.g. `rate(pressure)`")?;
                let input = self.metric_arg(name, args, pos)?;
                let node = self.detector(
                    DetSpec {
                        kind: DetKind::Rate,
                        input,
                        window: NO_WINDOW,
                    },
                    pos,
                );
                Some((node, Ty::Num))
            }
            "flatline" => {
                self.arity(name, args, pos, 2, 3, "a metric, a duration and optionally a tolerance, e.g. `flatline(temperature, 10m)`")?;
                let input = self.metric_arg(name, args, pos);
                let dur = self.duration_arg(name, &args[1]);
                let tolerance = match args.get(2) {
                    Some(a) => self.const_num(name, "the tolerance", a, 0.0, f64::MAX, false),
                    None => Some(0.0),
                };
                let (input, dur_ms, tolerance) = (input?, dur?, tolerance?);
                let node = self.detector(
                    DetSpec {
                        kind: DetKind::Flatline { dur_ms, tolerance },
                        input,
                        window: NO_WINDOW,
                    },
                    pos,
                );
                Some((node, Ty::Bool))
            }
            "missing" => {
                self.arity(
                    name,
                    args,
                    pos,
                    2,
                    2,
                    "a metric and a duration, e.g. `missing(temperature, 2m)`",
                )?;
                let input = self.metric_arg(name, args, pos);
                let dur = self.duration_arg(name, &args[1]);
                let (input, dur_ms) = (input?, dur?);
                let node = self.detector(
                    DetSpec {
                        kind: DetKind::Missing { dur_ms },
                        input,
                        window: NO_WINDOW,
                    },
                    pos,
                );
                Some((node, Ty::Bool))
            }
            "abs" => {
                self.arity(
                    name,
                    args,
                    pos,
                    1,
                    1,
                    "a number, e.g. `abs(temperature - 20)`",
                )?;
                let (n, ty) = self.expr(&args[0])?;
                self.want(ty, Ty::Num, args[0].pos(), "`abs`")?;
                Some((Node::Abs(Box::new(n)), Ty::Num))
            }
            _ => {
                self.error(pos, format!("unknown function `{name}`: see rules/README.md for the list (avg, min, max, sum, count, stddev, median, percentile, zscore, ewma, ewma_dev, rate, flatline, missing, mad_score, mad_outlier, abs)"));
                None
            }
        }
    }

    fn duration_arg(&mut self, name: &str, arg: &Expr<'a>) -> Option<u64> {
        match arg {
            Expr::Dur(ms, pos) => {
                let before = self.errors.len();
                let ms = self.duration(*ms, *pos);
                (self.errors.len() == before).then_some(ms)
            }
            other => {
                self.error(
                    other.pos(),
                    format!("second argument of `{name}` must be a duration such as `2m`"),
                );
                None
            }
        }
    }

    fn window_spec(&self, w: Window, sorted: bool, values: bool) -> WindowSpec {
        match w {
            Window::Samples(n) => WindowSpec {
                cap: n,
                horizon_ms: 0,
                sorted,
                values,
            },
            Window::Time(ms) => WindowSpec {
                cap: self.limits.time_window_samples,
                horizon_ms: ms,
                sorted,
                values,
            },
        }
    }
}

const NO_WINDOW: WindowSpec = WindowSpec {
    cap: 0,
    horizon_ms: 0,
    sorted: false,
    values: false,
};
