//! Tensor names as training frameworks spell them, reduced to the names a checkpoint of the bare
//! model would use, so that a DDP-, FSDP- or `torch.compile`-saved checkpoint pairs with its base
//! and a mask matches a wrapped model's parameters.

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
