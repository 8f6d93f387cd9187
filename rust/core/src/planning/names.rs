//! Tensor names as training frameworks spell them, reduced to the names a checkpoint of the bare
//! model would use, so that a DDP-, FSDP- or `torch.compile`-saved checkpoint pairs with its base
//! and a mask matches a wrapped model's parameters.

use std::cmp::Ordering;

/// The natural order of names (`layers.2` before `layers.10`), as Python's
/// `rlmask._names.natural_key` gives it for ASCII names: each name is cut into runs of text and
/// runs of digits, compared run by run, text by bytes and digits by value; a name whose runs
/// end first comes first. Names of equal keys (`a01`, `a1`) compare equal, so a stable sort
/// keeps their order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    let run = |s: &[u8], digits: bool| {
        s.iter()
            .position(|c| c.is_ascii_digit() != digits)
            .unwrap_or(s.len())
    };
    loop {
        let (tx, ty) = (run(x, false), run(y, false));
        match x[..tx].cmp(&y[..ty]) {
            Ordering::Equal => {}
            other => return other,
        }
        (x, y) = (&x[tx..], &y[ty..]);
        match (x.is_empty(), y.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => {}
        }
        let (nx, ny) = (run(x, true), run(y, true));
        let value = |d: &'_ [u8]| -> usize { d.iter().position(|&c| c != b'0').unwrap_or(d.len()) };
        let (vx, vy) = (&x[value(&x[..nx])..nx], &y[value(&y[..ny])..ny]);
        match vx.len().cmp(&vy.len()).then_with(|| vx.cmp(vy)) {
            Ordering::Equal => {}
            other => return other,
        }
        (x, y) = (&x[nx..], &y[ny..]);
    }
}

/// Segments that wrappers insert anywhere in a parameter name; removed before pairing.
pub const WRAPPER_SEGMENTS: [&str; 3] = [
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
    "_orig_mod",
];

/// The prefix DDP (and `DataParallel`) puts in front of every name; removed once, at the start.
pub const DDP_PREFIX: &str = "module";

/// `name` without wrapper segments or a leading `module.`, then with the longest matching
/// `(from, to)` prefix of `map` replaced (`("", "model.")` adds a prefix,
/// `("base_model.model.", "")` removes one).
pub fn canonical(name: &str, map: &[(String, String)]) -> String {
    let mut parts: Vec<&str> = name
        .split('.')
        .filter(|p| !WRAPPER_SEGMENTS.contains(p))
        .collect();
    if parts.len() > 1 && parts[0] == DDP_PREFIX {
        parts.remove(0);
    }
    let stripped = parts.join(".");
    let best = map
        .iter()
        .filter(|(from, _)| stripped.starts_with(from.as_str()))
        .max_by_key(|(from, _)| from.len());
    match best {
        Some((from, to)) => format!("{to}{}", &stripped[from.len()..]),
        None => stripped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_as_python_gives_it() {
        let mut names = vec![
            "model.layers.10.mlp",
            "model.layers.2.mlp",
            "model.layers.2",
            "a1b",
            "a1",
            "a",
            "a01",
            "1",
            "",
            "a0010",
            "a9",
            "x99999999999999999999999",
            "x100000000000000000000000",
            "b",
            "a1a",
        ];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            vec![
                // a1 and a01 have equal keys: the stable sort keeps their order.
                "",
                "1",
                "a",
                "a1",
                "a01",
                "a1a",
                "a1b",
                "a9",
                "a0010",
                "b",
                "model.layers.2",
                "model.layers.2.mlp",
                "model.layers.10.mlp",
                "x99999999999999999999999",
                "x100000000000000000000000",
            ]
        );
    }

    #[test]
    fn strips_wrappers_and_maps_prefixes() {
        let none: [(String, String); 0] = [];
        assert_eq!(
            canonical(
                "module._orig_mod.model.layers.0._fsdp_wrapped_module.w",
                &none
            ),
            "model.layers.0.w"
        );
        assert_eq!(canonical("model.module.w", &none), "model.module.w");
        assert_eq!(canonical("module", &none), "module");
        let map = [
            ("base_model.".to_string(), "x.".to_string()),
            ("base_model.model.".to_string(), "".to_string()),
        ];
        assert_eq!(
            canonical("base_model.model.lm_head.weight", &map),
            "lm_head.weight"
        );
        assert_eq!(canonical("base_model.w", &map), "x.w");
        let add = [("".to_string(), "model.".to_string())];
        assert_eq!(canonical("layers.0.w", &add), "model.layers.0.w");
    }
}
