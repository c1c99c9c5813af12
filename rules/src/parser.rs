//! Parser: tokens to a syntax tree, recovering at clause boundaries.
//!
//! A bundle is a sequence of rules; a rule is `rule NAME` followed by clauses, each starting
//! with a reserved keyword, so after a mistake the parser skips to the next clause keyword
//! and keeps going. Recursion is bounded by [`MAX_EXPR_DEPTH`].

use crate::error::{CompileError, Pos};
use crate::lexer::{Tok, Token};
use crate::limits::MAX_EXPR_DEPTH;

/// Words that start a clause; they end an expression and cannot be metric names.
const CLAUSE_KEYWORDS: &[&str] = &[
    "rule",
    "on",
    "when",
    "clear",
    "alert",
    "command",
    "forward",
    "drop",
    "tag",
    "max_devices",
];
/// Every reserved word.
pub(crate) const RESERVED: &[&str] = &[
    "rule",
    "on",
    "when",
    "clear",
    "alert",
    "command",
    "forward",
    "drop",
    "tag",
    "max_devices",
    "device",
    "metric",
    "for",
    "to",
    "of",
    "every",
    "and",
    "or",
    "not",
    "true",
    "false",
    "samples",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UnOp {
    Neg,
    Not,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Expr<'a> {
    Num(f64, bool, Pos),
    Bool(bool, Pos),
    Metric(&'a str, Pos),
    Dur(u64, Pos),
    Samples(u64, Pos),
    /// A string where a value was expected; kept so the compiler can say what was wanted.
    Str(Pos),
    Call {
        name: &'a str,
        args: Vec<Expr<'a>>,
        pos: Pos,
    },
    Unary(UnOp, Box<Expr<'a>>, Pos),
    Binary(BinOp, Box<Expr<'a>>, Box<Expr<'a>>, Pos),
}

impl Expr<'_> {
    pub(crate) fn pos(&self) -> Pos {
        match self {
            Expr::Num(_, _, p)
            | Expr::Bool(_, p)
            | Expr::Metric(_, p)
            | Expr::Dur(_, p)
            | Expr::Samples(_, p)
            | Expr::Str(p)
            | Expr::Call { pos: p, .. }
            | Expr::Unary(_, _, p)
            | Expr::Binary(_, _, _, p) => *p,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spanned<T> {
    pub value: T,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ArgLit {
    Number(f64),
    Bool(bool),
    Text(Box<str>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CommandAst<'a> {
    pub name: Spanned<&'a str>,
    pub args: Vec<(Spanned<&'a str>, ArgLit)>,
    pub target: Option<Spanned<Box<str>>>,
    pub on_clear: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ForwardAst<'a> {
    pub functions: Vec<Spanned<&'a str>>,
    pub metric: Spanned<&'a str>,
    pub every: Spanned<u64>,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Condition<'a> {
    pub expr: Expr<'a>,
    pub for_ms: Option<Spanned<u64>>,
    pub pos: Pos,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct RuleAst<'a> {
    pub name: &'a str,
    pub pos: Pos,
    /// Index range of this rule's tokens, for its fingerprint.
    pub tokens: (usize, usize),
    pub device: Option<Spanned<Box<str>>>,
    pub metric: Option<Spanned<Box<str>>>,
    pub when: Option<Condition<'a>>,
    pub clear: Option<Condition<'a>>,
    pub alert: Option<(Spanned<&'a str>, Box<str>)>,
    pub commands: Vec<CommandAst<'a>>,
    pub forward: Option<ForwardAst<'a>>,
    pub drop: Option<Pos>,
    pub tags: Vec<(Spanned<&'a str>, Box<str>)>,
    pub max_devices: Option<Spanned<u64>>,
    /// Set when a clause failed to parse; the compiler then skips semantic checks that would
    /// only repeat the same mistake.
    pub broken: bool,
}

pub(crate) struct Parser<'t, 'a> {
    toks: &'t [Token<'a>],
    i: usize,
    pub errors: Vec<CompileError>,
}

type PResult<T> = Result<T, ()>;

impl<'t, 'a> Parser<'t, 'a> {
    pub(crate) fn new(toks: &'t [Token<'a>]) -> Self {
        Parser {
            toks,
            i: 0,
            errors: Vec::new(),
        }
    }

    fn peek(&self) -> &'t Token<'a> {
        // The lexer always ends with Eof and the parser never moves past it.
        &self.toks[self.i.min(self.toks.len() - 1)]
    }

    fn next(&mut self) -> &'t Token<'a> {
        let t = self.peek();
        if t.tok != Tok::Eof {
            self.i += 1;
        }
        t
    }

    fn is_kw(&self, kw: &str) -> bool {
        let t = self.peek();
        t.tok == Tok::Ident && t.text == kw
    }

    fn at_clause_start(&self) -> bool {
        let t = self.peek();
        t.tok == Tok::Eof || (t.tok == Tok::Ident && CLAUSE_KEYWORDS.contains(&t.text))
    }

    fn err<T>(&mut self, pos: Pos, msg: impl Into<String>) -> PResult<T> {
        // A token the lexer already reported gets no second message.
        let at_lex_error = [self.i.wrapping_sub(1), self.i]
            .iter()
            .filter_map(|i| self.toks.get(*i))
            .any(|t| t.tok == Tok::Error && t.pos == pos);
        if !at_lex_error {
            self.errors.push(CompileError::new(pos, msg));
        }
        Err(())
    }

    fn describe(t: &Token<'_>) -> String {
        match t.tok {
            Tok::Eof => "end of input".to_string(),
            Tok::Str(_) => format!("string {}", t.text),
            _ => format!("`{}`", t.text),
        }
    }

    fn expect_kw(&mut self, kw: &str, ctx: &str) -> PResult<Pos> {
        let t = self.peek();
        if t.tok == Tok::Ident && t.text == kw {
            self.next();
            Ok(t.pos)
        } else {
            self.err(
                t.pos,
                format!("expected `{kw}` {ctx}, found {}", Self::describe(t)),
            )
        }
    }

    fn expect(&mut self, tok: Tok, what: &str) -> PResult<Pos> {
        let t = self.peek();
        if t.tok == tok {
            self.next();
            Ok(t.pos)
        } else {
            self.err(
                t.pos,
                format!("expected {what}, found {}", Self::describe(t)),
            )
        }
    }

    fn ident(&mut self, what: &str) -> PResult<Spanned<&'a str>> {
        let t = self.peek();
        if t.tok == Tok::Ident && !RESERVED.contains(&t.text) {
            self.next();
            Ok(Spanned {
                value: t.text,
                pos: t.pos,
            })
        } else if t.tok == Tok::Ident {
            self.err(
                t.pos,
                format!("expected {what}, found keyword `{}`", t.text),
            )
        } else {
            self.err(
                t.pos,
                format!("expected {what}, found {}", Self::describe(t)),
            )
        }
    }

    fn string(&mut self, what: &str) -> PResult<Spanned<Box<str>>> {
        let t = self.peek();
        if let Tok::Str(s) = &t.tok {
            self.next();
            Ok(Spanned {
                value: s.clone(),
                pos: t.pos,
            })
        } else {
            self.err(
                t.pos,
                format!(
                    "expected {what} (a quoted string), found {}",
                    Self::describe(t)
                ),
            )
        }
    }

    fn duration(&mut self, what: &str) -> PResult<Spanned<u64>> {
        let t = self.peek();
        if let Tok::Dur(ms) = t.tok {
            self.next();
            Ok(Spanned {
                value: ms,
                pos: t.pos,
            })
        } else {
            self.err(
                t.pos,
                format!(
                    "expected {what} (a duration such as 30s or 5m), found {}",
                    Self::describe(t)
                ),
            )
        }
    }

    /// Parses the whole bundle. Never fails: problems go to `self.errors`.
    pub(crate) fn bundle(&mut self) -> Vec<RuleAst<'a>> {
        let mut rules = Vec::new();
        while self.peek().tok != Tok::Eof {
            if !self.is_kw("rule") {
                let t = self.peek();
                self.errors.push(CompileError::new(
                    t.pos,
                    format!("expected `rule`, found {}", Self::describe(t)),
                ));
                // Skip to the next rule.
                self.next();
                while self.peek().tok != Tok::Eof && !self.is_kw("rule") {
                    self.next();
                }
                continue;
            }
            rules.push(self.rule());
        }
        rules
    }

    fn rule(&mut self) -> RuleAst<'a> {
        let start = self.i;
        let pos = self.next().pos; // `rule`
        let mut r = RuleAst {
            pos,
            ..RuleAst::default()
        };
        match self.ident("a rule name") {
            Ok(n) => r.name = n.value,
            Err(()) => {
                r.broken = true;
                if !self.at_clause_start() {
                    self.next();
                }
            }
        }
        while !self.is_kw("rule") && self.peek().tok != Tok::Eof {
            if self.clause(&mut r).is_err() {
                r.broken = true;
                // Resynchronise: the failed clause's remaining tokens are skipped.
                if !self.at_clause_start() {
                    self.next();
                }
                while !self.at_clause_start() {
                    self.next();
                }
            }
        }
        r.tokens = (start, self.i);
        r
    }

    fn dup<T>(&mut self, pos: Pos, what: &str) -> PResult<T> {
        self.err(pos, format!("rule already has a `{what}` clause; write one and combine conditions with `and`/`or`"))
    }

    fn clause(&mut self, r: &mut RuleAst<'a>) -> PResult<()> {
        let t = self.peek();
        if t.tok != Tok::Ident || !CLAUSE_KEYWORDS.contains(&t.text) {
            return self.err(
                t.pos,
                format!(
                    "expected a clause (on, when, clear when, alert, command, forward, drop, tag, max_devices), found {}",
                    Self::describe(t)
                ),
            );
        }
        let kw = t.text;
        let pos = t.pos;
        self.next();
        match kw {
            "on" => {
                if r.device.is_some() || r.metric.is_some() {
                    return self.dup(pos, "on");
                }
                let mut any = false;
                if self.is_kw("device") {
                    self.next();
                    r.device = Some(self.string("a device pattern")?);
                    any = true;
                }
                if self.is_kw("metric") {
                    self.next();
                    r.metric = Some(self.string("a metric pattern")?);
                    any = true;
                }
                if !any {
                    let t = self.peek();
                    return self.err(
                        t.pos,
                        format!(
                            "expected `device` or `metric` after `on`, found {}",
                            Self::describe(t)
                        ),
                    );
                }
            }
            "when" => {
                if r.when.is_some() {
                    return self.dup(pos, "when");
                }
                r.when = Some(self.condition(pos)?);
            }
            "clear" => {
                self.expect_kw("when", "after `clear`")?;
                if r.clear.is_some() {
                    return self.dup(pos, "clear when");
                }
                r.clear = Some(self.condition(pos)?);
            }
            "alert" => {
                let sev = self.ident("a severity (info, warning or critical)")?;
                let msg = self.string("an alert message")?;
                if r.alert.is_some() {
                    return self.dup(pos, "alert");
                }
                r.alert = Some((sev, msg.value));
            }
            "command" => {
                let name = self.ident("a command name")?;
                self.expect(Tok::LParen, "`(` after the command name")?;
                let mut args = Vec::new();
                if self.peek().tok != Tok::RParen {
                    loop {
                        let key = self.ident("an argument name")?;
                        self.expect(Tok::Assign, "`=` after the argument name")?;
                        let v = self.arg_literal()?;
                        args.push((key, v));
                        if self.peek().tok == Tok::Comma {
                            self.next();
                        } else {
                            break;
                        }
                    }
                }
                self.expect(Tok::RParen, "`,` or `)` in the command's arguments")?;
                let mut target = None;
                if self.is_kw("to") {
                    self.next();
                    self.expect_kw("device", "after `to`")?;
                    target = Some(self.string("a device name")?);
                }
                let mut on_clear = false;
                if self.is_kw("on") && self.toks.get(self.i + 1).is_some_and(|t| t.text == "clear")
                {
                    self.next();
                    self.next();
                    on_clear = true;
                }
                r.commands.push(CommandAst {
                    name,
                    args,
                    target,
                    on_clear,
                });
            }
            "forward" => {
                let mut functions =
                    vec![self.ident("an aggregate (avg, min, max, sum, count, last)")?];
                while self.peek().tok == Tok::Comma {
                    self.next();
                    functions.push(self.ident("an aggregate (avg, min, max, sum, count, last)")?);
                }
                self.expect_kw("of", "after the aggregates")?;
                let metric = self.ident("a metric name")?;
                self.expect_kw("every", "after the metric")?;
                let every = self.duration("a downsampling period")?;
                if r.forward.is_some() {
                    return self.dup(pos, "forward");
                }
                r.forward = Some(ForwardAst {
                    functions,
                    metric,
                    every,
                    pos,
                });
            }
            "drop" => {
                if r.drop.is_some() {
                    return self.dup(pos, "drop");
                }
                r.drop = Some(pos);
                // `drop when ...` is the same as `when ...` plus `drop`.
                if self.is_kw("when") {
                    let wpos = self.next().pos;
                    if r.when.is_some() {
                        return self.dup(wpos, "when");
                    }
                    r.when = Some(self.condition(wpos)?);
                }
            }
            "tag" => {
                let key = self.ident("a tag name")?;
                self.expect(Tok::Assign, "`=` after the tag name")?;
                let v = self.string("a tag value")?;
                r.tags.push((key, v.value));
            }
            "max_devices" => {
                let t = self.peek();
                match t.tok {
                    Tok::Num { value, int: true } => {
                        self.next();
                        if r.max_devices.is_some() {
                            return self.dup(pos, "max_devices");
                        }
                        r.max_devices = Some(Spanned {
                            value: value as u64,
                            pos: t.pos,
                        });
                    }
                    _ => {
                        return self.err(
                            t.pos,
                            format!(
                                "expected a whole number of devices, found {}",
                                Self::describe(t)
                            ),
                        )
                    }
                }
            }
            _ => {
                // `rule` is handled by the caller; unreachable in practice but harmless.
                return self.err(pos, format!("unexpected `{kw}`"));
            }
        }
        Ok(())
    }

    fn arg_literal(&mut self) -> PResult<ArgLit> {
        let t = self.next();
        match &t.tok {
            Tok::Num { value, .. } => Ok(ArgLit::Number(*value)),
            Tok::Minus => match self.peek().tok {
                Tok::Num { value, .. } => {
                    self.next();
                    Ok(ArgLit::Number(-value))
                }
                _ => self.err(t.pos, "expected a number after `-`"),
            },
            Tok::Str(s) => Ok(ArgLit::Text(s.clone())),
            Tok::Ident if t.text == "true" => Ok(ArgLit::Bool(true)),
            Tok::Ident if t.text == "false" => Ok(ArgLit::Bool(false)),
            _ => self.err(
                t.pos,
                format!(
                    "expected a command argument value (number, string, true or false), found {}",
                    Self::describe(t)
                ),
            ),
        }
    }

    fn condition(&mut self, pos: Pos) -> PResult<Condition<'a>> {
        let expr = self.expr(0)?;
        let mut for_ms = None;
        if self.is_kw("for") {
            self.next();
            for_ms = Some(self.duration("how long the condition must hold")?);
        }
        if !self.at_clause_start() {
            let t = self.peek();
            return self.err(
                t.pos,
                format!("unexpected {} after the condition", Self::describe(t)),
            );
        }
        Ok(Condition { expr, for_ms, pos })
    }

    fn expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        if depth > MAX_EXPR_DEPTH {
            let p = self.peek().pos;
            return self.err(
                p,
                format!("expression nested deeper than {MAX_EXPR_DEPTH} levels"),
            );
        }
        let mut lhs = self.and_expr(depth + 1)?;
        while self.is_kw("or") {
            let p = self.next().pos;
            let rhs = self.and_expr(depth + 1)?;
            lhs = Expr::Binary(BinOp::Or, Box::new(lhs), Box::new(rhs), p);
        }
        Ok(lhs)
    }

    fn and_expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        let mut lhs = self.not_expr(depth + 1)?;
        while self.is_kw("and") {
            let p = self.next().pos;
            let rhs = self.not_expr(depth + 1)?;
            lhs = Expr::Binary(BinOp::And, Box::new(lhs), Box::new(rhs), p);
        }
        Ok(lhs)
    }

    fn not_expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        if depth > MAX_EXPR_DEPTH {
            let p = self.peek().pos;
            return self.err(
                p,
                format!("expression nested deeper than {MAX_EXPR_DEPTH} levels"),
            );
        }
        if self.is_kw("not") {
            let p = self.next().pos;
            let e = self.not_expr(depth + 1)?;
            return Ok(Expr::Unary(UnOp::Not, Box::new(e), p));
        }
        self.cmp_expr(depth + 1)
    }

    fn cmp_expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        let lhs = self.sum_expr(depth + 1)?;
        let op = match self.peek().tok {
            Tok::Lt => BinOp::Lt,
            Tok::Le => BinOp::Le,
            Tok::Gt => BinOp::Gt,
            Tok::Ge => BinOp::Ge,
            Tok::EqEq => BinOp::Eq,
            Tok::NotEq => BinOp::Ne,
            Tok::Assign => {
                let p = self.peek().pos;
                return self.err(p, "`=` assigns; compare with `==`");
            }
            _ => return Ok(lhs),
        };
        let p = self.next().pos;
        let rhs = self.sum_expr(depth + 1)?;
        if matches!(
            self.peek().tok,
            Tok::Lt | Tok::Le | Tok::Gt | Tok::Ge | Tok::EqEq | Tok::NotEq
        ) {
            let p2 = self.peek().pos;
            return self.err(p2, "comparisons do not chain: write `a < b and b < c`");
        }
        Ok(Expr::Binary(op, Box::new(lhs), Box::new(rhs), p))
    }

    fn sum_expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        let mut lhs = self.prod_expr(depth + 1)?;
        loop {
            let op = match self.peek().tok {
                Tok::Plus => BinOp::Add,
                Tok::Minus => BinOp::Sub,
                _ => return Ok(lhs),
            };
            let p = self.next().pos;
            let rhs = self.prod_expr(depth + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs), p);
        }
    }

    fn prod_expr(&mut self, depth: usize) -> PResult<Expr<'a>> {
        let mut lhs = self.unary(depth + 1)?;
        loop {
            let op = match self.peek().tok {
                Tok::Star => BinOp::Mul,
                Tok::Slash => BinOp::Div,
                _ => return Ok(lhs),
            };
            let p = self.next().pos;
            let rhs = self.unary(depth + 1)?;
            lhs = Expr::Binary(op, Box::new(lhs), Box::new(rhs), p);
        }
    }

    fn unary(&mut self, depth: usize) -> PResult<Expr<'a>> {
        if depth > MAX_EXPR_DEPTH {
            let p = self.peek().pos;
            return self.err(
                p,
                format!("expression nested deeper than {MAX_EXPR_DEPTH} levels"),
            );
        }
        if self.peek().tok == Tok::Minus {
            let p = self.next().pos;
            let e = self.unary(depth + 1)?;
            return Ok(Expr::Unary(UnOp::Neg, Box::new(e), p));
        }
        self.atom(depth + 1)
    }

    fn atom(&mut self, depth: usize) -> PResult<Expr<'a>> {
        let t = self.next();
        match &t.tok {
            Tok::Num { value, int } => {
                if *int && self.is_kw("samples") {
                    self.next();
                    return Ok(Expr::Samples(*value as u64, t.pos));
                }
                Ok(Expr::Num(*value, *int, t.pos))
            }
            Tok::Dur(ms) => Ok(Expr::Dur(*ms, t.pos)),
            Tok::Str(_) => Ok(Expr::Str(t.pos)),
            Tok::LParen => {
                let e = self.expr(depth + 1)?;
                self.expect(Tok::RParen, "`)`")?;
                Ok(e)
            }
            Tok::Ident if t.text == "true" => Ok(Expr::Bool(true, t.pos)),
            Tok::Ident if t.text == "false" => Ok(Expr::Bool(false, t.pos)),
            Tok::Ident if RESERVED.contains(&t.text) => self.err(
                t.pos,
                format!("expected a value, found keyword `{}`", t.text),
            ),
            Tok::Ident => {
                if self.peek().tok != Tok::LParen {
                    return Ok(Expr::Metric(t.text, t.pos));
                }
                self.next();
                let mut args = Vec::new();
                if self.peek().tok != Tok::RParen {
                    loop {
                        args.push(self.expr(depth + 1)?);
                        if self.peek().tok == Tok::Comma {
                            self.next();
                        } else {
                            break;
                        }
                    }
                }
                self.expect(Tok::RParen, "`,` or `)` in the call's arguments")?;
                Ok(Expr::Call {
                    name: t.text,
                    args,
                    pos: t.pos,
                })
            }
            _ => self.err(
                t.pos,
                format!(
                    "expected a value (number, metric or function call), found {}",
                    Self::describe(t)
                ),
            ),
        }
    }
}
