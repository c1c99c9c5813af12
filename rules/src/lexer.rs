//! Lexer: rule text to tokens with positions.
//!
//! Whitespace and newlines separate tokens and mean nothing else; `#` starts a comment that
//! runs to the end of the line. A bad character or literal becomes a [`CompileError`] and
//! lexing goes on, so one typo does not hide the rest of the bundle's mistakes.

use crate::error::{CompileError, Pos};
use crate::limits::MAX_STRING_LEN;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    /// Identifier or keyword (keywords are told apart by the parser).
    Ident,
    /// String literal, escapes resolved.
    Str(Box<str>),
    /// Number; `int` is set when it was written without a fraction or exponent.
    Num {
        value: f64,
        int: bool,
    },
    /// Duration literal such as `30s`, in milliseconds.
    Dur(u64),
    LParen,
    RParen,
    Comma,
    Assign,
    EqEq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Star,
    Slash,
    /// Text the lexer already reported as an error; the parser says nothing more about it.
    Error,
    Eof,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token<'a> {
    pub tok: Tok,
    /// The source text of the token (used for identifiers, messages and the plan hash).
    pub text: &'a str,
    pub pos: Pos,
}

/// Milliseconds per duration unit.
fn unit_ms(unit: &str) -> Option<u64> {
    match unit {
        "ms" => Some(1),
        "s" => Some(1_000),
        "m" => Some(60_000),
        "h" => Some(3_600_000),
        "d" => Some(86_400_000),
        _ => None,
    }
}

pub(crate) fn lex<'a>(src: &'a str, errors: &mut Vec<CompileError>) -> Vec<Token<'a>> {
    let mut out = Vec::new();
    let bytes = src.as_bytes();
    let mut i = 0usize;
    let mut line = 1u32;
    let mut col = 1u32;
    // Advances over one char, keeping line and column right.
    macro_rules! bump {
        () => {{
            let c = src[i..].chars().next().unwrap_or('\0');
            i += c.len_utf8().max(1);
            if c == '\n' {
                line += 1;
                col = 1;
            } else {
                col += 1;
            }
            c
        }};
    }
    while i < bytes.len() {
        let c = src[i..].chars().next().unwrap_or('\0');
        let pos = Pos { line, col };
        let start = i;
        if c.is_whitespace() {
            bump!();
            continue;
        }
        if c == '#' {
            while i < bytes.len() && bytes[i] != b'\n' {
                bump!();
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b'.')
            {
                bump!();
            }
            out.push(Token {
                tok: Tok::Ident,
                text: &src[start..i],
                pos,
            });
            continue;
        }
        if c.is_ascii_digit() {
            let mut int = true;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                bump!();
            }
            if i + 1 < bytes.len() && bytes[i] == b'.' && bytes[i + 1].is_ascii_digit() {
                int = false;
                bump!();
                while i < bytes.len() && bytes[i].is_ascii_digit() {
                    bump!();
                }
            }
            // An exponent only when digits follow, so `2m` stays a duration.
            if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                let mut j = i + 1;
                if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
                    j += 1;
                }
                if j < bytes.len() && bytes[j].is_ascii_digit() {
                    int = false;
                    while i < j {
                        bump!();
                    }
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        bump!();
                    }
                }
            }
            let num_text = &src[start..i];
            let value: f64 = num_text.parse().unwrap_or(f64::INFINITY);
            if i < bytes.len() && (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_') {
                let ustart = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    bump!();
                }
                let unit = &src[ustart..i];
                match unit_ms(unit) {
                    Some(ms) => {
                        let total = value * ms as f64;
                        let bad = !total.is_finite()
                            || total > u64::MAX as f64 / 2.0
                            || total.fract() != 0.0;
                        if bad {
                            out.push(Token {
                                tok: Tok::Error,
                                text: &src[start..i],
                                pos,
                            });
                        }
                        if !total.is_finite() || total > u64::MAX as f64 / 2.0 {
                            errors.push(CompileError::new(
                                pos,
                                format!("duration `{}` is too long", &src[start..i]),
                            ));
                        } else if total.fract() != 0.0 {
                            errors.push(CompileError::new(
                                pos,
                                format!(
                                    "duration `{}` is not a whole number of milliseconds",
                                    &src[start..i]
                                ),
                            ));
                        } else {
                            out.push(Token {
                                tok: Tok::Dur(total as u64),
                                text: &src[start..i],
                                pos,
                            });
                        }
                    }
                    None => {
                        out.push(Token {
                            tok: Tok::Error,
                            text: &src[start..i],
                            pos,
                        });
                        errors.push(CompileError::new(
                            pos,
                            format!(
                                "unknown duration unit `{unit}` in `{}`: use ms, s, m, h or d",
                                &src[start..i]
                            ),
                        ));
                    }
                }
                continue;
            }
            if !value.is_finite() {
                out.push(Token {
                    tok: Tok::Error,
                    text: num_text,
                    pos,
                });
                errors.push(CompileError::new(
                    pos,
                    format!("number `{num_text}` is too large"),
                ));
                continue;
            }
            out.push(Token {
                tok: Tok::Num { value, int },
                text: num_text,
                pos,
            });
            continue;
        }
        if c == '"' {
            bump!();
            let mut s = String::new();
            let mut closed = false;
            while i < bytes.len() {
                let ch = bump!();
                match ch {
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\n' => break,
                    '\\' => {
                        if i >= bytes.len() {
                            break;
                        }
                        let epos = Pos { line, col: col - 1 };
                        match bump!() {
                            '"' => s.push('"'),
                            '\\' => s.push('\\'),
                            'n' => s.push('\n'),
                            't' => s.push('\t'),
                            '\n' => break,
                            other => errors.push(CompileError::new(
                                epos,
                                format!("unknown escape `\\{other}` in string: use \\\", \\\\, \\n or \\t"),
                            )),
                        }
                    }
                    other => s.push(other),
                }
            }
            if !closed {
                out.push(Token {
                    tok: Tok::Error,
                    text: &src[start..i],
                    pos,
                });
                errors.push(CompileError::new(
                    pos,
                    "unterminated string: add the closing `\"` on the same line",
                ));
                continue;
            }
            if s.len() > MAX_STRING_LEN {
                out.push(Token {
                    tok: Tok::Error,
                    text: &src[start..i],
                    pos,
                });
                errors.push(CompileError::new(
                    pos,
                    format!(
                        "string of {} bytes is longer than the limit of {MAX_STRING_LEN}",
                        s.len()
                    ),
                ));
                continue;
            }
            out.push(Token {
                tok: Tok::Str(s.into_boxed_str()),
                text: &src[start..i],
                pos,
            });
            continue;
        }
        bump!();
        let next = if i < bytes.len() { bytes[i] } else { 0 };
        let tok = match (c, next) {
            ('(', _) => Tok::LParen,
            (')', _) => Tok::RParen,
            (',', _) => Tok::Comma,
            ('+', _) => Tok::Plus,
            ('-', _) => Tok::Minus,
            ('*', _) => Tok::Star,
            ('/', _) => Tok::Slash,
            ('=', b'=') => {
                bump!();
                Tok::EqEq
            }
            ('=', _) => Tok::Assign,
            ('!', b'=') => {
                bump!();
                Tok::NotEq
            }
            ('<', b'=') => {
                bump!();
                Tok::Le
            }
            ('<', _) => Tok::Lt,
            ('>', b'=') => {
                bump!();
                Tok::Ge
            }
            ('>', _) => Tok::Gt,
            _ => {
                errors.push(CompileError::new(
                    pos,
                    format!("unexpected character `{}`", c.escape_debug()),
                ));
                continue;
            }
        };
        out.push(Token {
            tok,
            text: &src[start..i],
            pos,
        });
    }
    out.push(Token {
        tok: Tok::Eof,
        text: "",
        pos: Pos { line, col },
    });
    out
}
