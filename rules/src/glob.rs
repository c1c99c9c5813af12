//! Wildcard patterns for device and metric selectors: `*` matches any run of characters
//! (also none), `?` exactly one; everything else matches itself. Case-sensitive.

/// True if `text` matches `pattern`. Linear-time greedy matching with single-star
/// backtracking, so a hostile pattern cannot make it exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p: &[u8] = pattern.as_bytes();
    let t: &[u8] = text.as_bytes();
    // Work on chars only where `?` needs it; bytes are fine for `*` and literals because
    // UTF-8 boundaries of literal matches line up.
    if pattern.contains('?') && !text.is_ascii() {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        return match_units(&p, &t, '*', '?');
    }
    match_units(p, t, b'*', b'?')
}

fn match_units<T: PartialEq + Copy>(p: &[T], t: &[T], star: T, one: T) -> bool {
    let (mut pi, mut ti) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == star {
            back = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == one || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((bp, bt)) = back {
            pi = bp + 1;
            ti = bt + 1;
            back = Some((bp, bt + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == star {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn wildcards() {
        assert!(glob_match("boiler-*", "boiler-1"));
        assert!(glob_match("boiler-*", "boiler-"));
        assert!(!glob_match("boiler-*", "boile"));
        assert!(glob_match("*", ""));
        assert!(glob_match("b?iler", "boiler"));
        assert!(!glob_match("b?iler", "biler"));
        assert!(glob_match("*-1", "fan-1"));
        assert!(!glob_match("*-1", "fan-2"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("t?", "tü"));
        assert!(!glob_match("fan", "fan-1"));
    }
}
