//! Names and paths as they may be shown on a terminal: control characters (ANSI escape
//! sequences, newlines, carriage returns, C1 controls) escaped, everything else kept. Reports
//! written to files (JSON, CSV, Parquet) carry names unchanged; only what is printed is escaped.

use std::borrow::Cow;
use std::fmt::Write;
use std::path::Path;

/// `s` with every control character written as an escape (`\n`, `\r`, `\t`, `\x1b`, `\u{9b}`),
/// and backslashes left as they are. Borrowed when nothing needs escaping.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x100 && c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A path for a message: lossily decoded, then [`printable`].
pub fn printable_path(p: &Path) -> String {
    printable(&p.to_string_lossy()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_only() {
        assert_eq!(printable("model.layers.0.w"), "model.layers.0.w");
        assert_eq!(
            printable("a\x1b[31mb\nc\rd\u{9b}e\u{7f}"),
            "a\\x1b[31mb\\nc\\rd\\x9be\\x7f"
        );
        assert_eq!(printable("é✓"), "é✓");
    }
}
