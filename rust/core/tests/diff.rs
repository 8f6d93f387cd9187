//! The core on its own: checkpoints written to disk, opened, paired and compared.

use std::collections::BTreeMap;
use std::path::Path;

use rlmask_core::safetensors::write_u8_tensors;
use rlmask_core::{bits, diff, Checkpoint, Criterion, DiffOptions, Error, MaskFileSpec, Progress};

fn write(path: &Path, tensors: &[(&str, &[u8])]) {
    write_u8_tensors(path, tensors, &BTreeMap::new()).unwrap();
}

/// Writes 1-D tensors `(name, dtype, raw bytes)`, laid out in the order given, as a
/// safetensors file.
fn write_tensors(path: &Path, tensors: &[(&str, &str, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, bytes) in tensors {
        let size = if *dtype == "F32" { 4 } else { 1 };
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": [bytes.len() / size], "data_offsets": [start, data.len()]}),
        );
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Writes F32 tensors as a safetensors file.
fn write_f32(path: &Path, tensors: &[(&str, &[f32])]) {
    let t: Vec<(&str, &str, Vec<u8>)> = tensors
        .iter()
        .map(|(n, v)| (*n, "F32", f32_bytes(v)))
        .collect();
    write_tensors(path, &t);
}

fn options(criterion: Criterion, mask: Option<usize>) -> DiffOptions {
    DiffOptions {
        mask_at: mask,
        ..DiffOptions::new(criterion)
    }
}

#[test]
fn pairs_counts_and_lists_one_sided_and_tied_names() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let x: Vec<u8> = (0..200u8).collect();
    let mut y = x.clone();
    for v in y.iter_mut().step_by(3) {
        *v ^= 1;
    }
    let exact = options(Criterion::Exact, None);
    // Only U8 tensors: nothing floating is compared, and that is an error, not sparsity 1.
    write(&a, &[("w", &x), ("old", &x)]);
    write(&b, &[("w", &y), ("new", &x)]);
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let err = diff(&ca, &cb, &exact, &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::Pairing { .. }), "{err}");
    assert!(err.to_string().contains("nothing to compare"), "{err}");

    // With a floating tensor on both sides, U8 tensors are counted beside it.
    let (fa, fb) = (
        dir.path().join("fa.safetensors"),
        dir.path().join("fb.safetensors"),
    );
    let f = vec![0.5f32; 64];
    write_f32(
        &fa,
        &[
            ("f", &f),
            ("lm_head.weight", &[1.0]),
            ("model.embed_tokens.weight", &[1.0]),
        ],
    );
    write_f32(&fb, &[("f", &f), ("model.embed_tokens.weight", &[1.0])]);
    let (cfa, cfb) = (
        Checkpoint::open(&fa).unwrap(),
        Checkpoint::open(&fb).unwrap(),
    );
    let r = diff(&cfa, &cfb, &exact, &Progress::default()).unwrap();
    // A head missing on one side only is a one-sided name, not a tied one.
    assert_eq!(r.only_in_base, vec!["lm_head.weight"]);
    assert!(r.tied.is_empty() && r.only_in_tuned.is_empty());
    // Tied: both sides have the embeddings and neither has a head.
    let r = diff(&cfb, &cfb, &exact, &Progress::default()).unwrap();
    assert_eq!(r.tied, vec!["lm_head.weight"]);
    assert!(r.only_in_base.is_empty() && r.only_in_tuned.is_empty());

    let mixed = |p: &Path, w: &[u8], extra: &str| {
        write_tensors(
            p,
            &[
                ("f", "F32", f32_bytes(&f)),
                ("w", "U8", w.to_vec()),
                (extra, "U8", vec![0]),
            ],
        )
    };
    mixed(&a, &x, "old");
    mixed(&b, &y, "new");
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let r = diff(&ca, &cb, &exact, &Progress::default()).unwrap();
    assert_eq!(r.only_in_base, vec!["old"]);
    assert_eq!(r.only_in_tuned, vec!["new"]);
    let w = r.tensors.iter().find(|t| t.name == "w").unwrap();
    // U8 tensors are compared bit for bit.
    assert_eq!((w.numel, w.floating, w.changed[0]), (200, false, 67));
    assert!(w.bits.is_none(), "masks cover floating tensors only");
}

#[test]
fn mostly_unpaired_names_and_name_maps() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let big = vec![1.0f32; 100];
    let small = vec![1.0f32; 10];
    write_f32(&a, &[("model.w", &big), ("model.v", &small)]);
    // DDP and torch.compile wrappers, as a wrapped model's state dict spells them.
    write_f32(
        &b,
        &[
            ("module._orig_mod.model.w", &big),
            ("module.model.v", &small),
        ],
    );
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let exact = options(Criterion::Exact, None);
    let r = diff(&ca, &cb, &exact, &Progress::default()).unwrap();
    assert_eq!(r.tensors.len(), 2);
    assert!(r.renamed_base.is_empty());
    assert_eq!(
        r.renamed_tuned,
        vec![
            (
                "module._orig_mod.model.w".to_string(),
                "model.w".to_string()
            ),
            ("module.model.v".to_string(), "model.v".to_string())
        ]
    );
    // Other prefixes need a name map; without one, most elements are unpaired: an error that
    // counts them and names examples.
    write_f32(&b, &[("base_model.model.w", &big), ("model.v", &small)]);
    let cb = Checkpoint::open(&b).unwrap();
    let err = diff(&ca, &cb, &exact, &Progress::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Pairing { .. }), "{msg}");
    assert!(
        msg.contains("100 of the 110 floating elements of base"),
        "{msg}"
    );
    assert!(
        msg.contains("'model.w'") && msg.contains("--name-map"),
        "{msg}"
    );
    let mut mapped = exact.clone();
    mapped.plan.name_map = vec![("base_model.model.".into(), "model.".into())];
    let r = diff(&ca, &cb, &mapped, &Progress::default()).unwrap();
    assert_eq!(r.tensors.len(), 2);
    // Half or less unpaired is reported, not refused.
    write_f32(&b, &[("model.w", &big), ("model.u", &small)]);
    let cb = Checkpoint::open(&b).unwrap();
    let r = diff(&ca, &cb, &exact, &Progress::default()).unwrap();
    assert_eq!((r.only_in_base.len(), r.only_in_tuned.len()), (1, 1));
    // Two stored names that pair as one are ambiguous.
    write_f32(&b, &[("model.w", &big), ("module.model.w", &big)]);
    let cb = Checkpoint::open(&b).unwrap();
    let err = diff(&ca, &cb, &exact, &Progress::default()).unwrap_err();
    assert!(err.to_string().contains("both pair as 'model.w'"), "{err}");
}

#[test]
fn a_file_truncated_while_mapped_is_an_error_not_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let n = 1 << 20; // 4 MiB: many pages past the cut
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    write_f32(&a, &[("w", &x)]);
    write_f32(&b, &[("w", &x)]);
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let file = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    file.set_len(4096).unwrap();
    let err = diff(
        &ca,
        &cb,
        &options(Criterion::Exact, None),
        &Progress::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Changed { .. }), "{err}");
    assert!(err.to_string().contains("b.safetensors"), "{err}");
    // A rewrite in place (same size, new time) is caught by the size and time check.
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&a).unwrap());
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_f32(&a, &[("w", &x)]);
    let err = diff(
        &ca,
        &cb,
        &options(Criterion::Exact, None),
        &Progress::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Changed { .. }) && err.to_string().contains("modified"),
        "{err}"
    );
}

#[test]
fn selection_mismatch_and_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    // A floating tensor on each side (the comparison needs one) beside U8 tensors.
    let zeros = f32_bytes(&[0.0; 4]);
    write_tensors(
        &a,
        &[
            ("f", "F32", zeros.clone()),
            ("x", "U8", vec![1; 8]),
            ("y", "U8", vec![1; 8]),
        ],
    );
    write_tensors(
        &b,
        &[
            ("f", "F32", zeros),
            ("x", "U8", vec![2; 8]),
            ("y", "U8", vec![1; 16]),
        ],
    );
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let progress = Progress::default();
    let err = diff(&ca, &cb, &options(Criterion::Exact, None), &progress).unwrap_err();
    assert!(
        matches!(err, Error::Mismatch { ref tensor, .. } if tensor == "y"),
        "{err}"
    );
    let mut opts = options(Criterion::Exact, None);
    opts.plan.skip_mismatched = true;
    let r = diff(&ca, &cb, &opts, &progress).unwrap();
    assert_eq!(r.skipped.len(), 1);
    let x = r.tensors.iter().find(|t| t.name == "x").unwrap();
    assert_eq!(x.changed, vec![8]);
    // Selecting only the mismatched tensor leaves nothing to compare: an error.
    opts.plan.select = Some(vec!["y".into()]);
    let err = diff(&ca, &cb, &opts, &progress).unwrap_err();
    assert!(
        matches!(err, Error::Pairing { .. }) && err.to_string().contains("1 skipped"),
        "{err}"
    );
    progress
        .cancel
        .store(true, std::sync::atomic::Ordering::Relaxed);
    opts.plan.select = None;
    assert!(matches!(
        diff(&ca, &cb, &opts, &progress),
        Err(Error::Cancelled)
    ));
}

#[test]
fn mask_bits_and_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..1000)
        .map(|i| i as f32 + if i % 7 == 0 { 0.5 } else { 1e-7 })
        .collect();
    for (path, data) in [(&a, &x), (&b, &y)] {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            data.len(),
            4 * data.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(path, bytes).unwrap();
    }
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let crit = Criterion::Absolute(vec![1e-8, 1e-3]);
    let r = diff(
        &ca,
        &cb,
        &options(crit.clone(), Some(1)),
        &Progress::default(),
    )
    .unwrap();
    let w = &r.tensors[0];
    // A reference, element by element (most 1e-7 steps vanish in f32 rounding).
    let want: Vec<u64> = [1e-8f32, 1e-3]
        .iter()
        .map(|&t| {
            x.iter()
                .zip(&y)
                .filter(|(p, q)| p.to_bits() != q.to_bits() && (*p - *q).abs() > t)
                .count() as u64
        })
        .collect();
    assert!(want[1] >= 143 && want[0] > want[1]);
    assert_eq!(w.changed, want);
    let bitsv = w.bits.as_ref().unwrap();
    assert_eq!(bitsv.len(), bits::padded_len(1000));
    assert_eq!(bits::count(bitsv, 1000).unwrap(), want[1]);
    // The same bits written straight into a mask file.
    let path = dir.path().join("m.rlmask");
    let mut opts = options(crit.clone(), Some(1));
    opts.mask_file = Some(MaskFileSpec {
        path: path.clone(),
        provenance: BTreeMap::from([("note".to_string(), "test".to_string())]),
    });
    let r2 = diff(&ca, &cb, &opts, &Progress::default()).unwrap();
    assert!(r2.tensors[0].bits.is_none() && r2.tensors[0].changed == want);
    let file = rlmask_core::maskfile::MaskFile::open(&path).unwrap();
    assert_eq!(file.packed("w").unwrap(), bitsv.as_slice());
    assert_eq!(file.metadata["note"], "test");
    assert_eq!(file.metadata["format"], "rlmask");
    assert_eq!(file.entries[0].numel, 1000);
    // A mask is not a checkpoint.
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(err.contains("is an rlmask mask file"), "{err}");
    let bad = options(Criterion::Absolute(vec![-1.0]), None);
    assert!(matches!(
        diff(&ca, &cb, &bad, &Progress::default()),
        Err(Error::InvalidArgument(_))
    ));
    let bad = options(crit, Some(2));
    assert!(matches!(
        diff(&ca, &cb, &bad, &Progress::default()),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn resized_rows_are_compared_on_the_rows_both_share() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let base: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let mut tuned = base.clone();
    tuned[3] += 1.0;
    tuned.extend([7.0, 8.0, 9.0]); // three rows added
    write_f32(&a, &[("embed", &base), ("w", &base)]);
    write_f32(&b, &[("embed", &tuned), ("w", &base)]);
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let exact = options(Criterion::Exact, Some(0));
    let err = diff(&ca, &cb, &exact, &Progress::default()).unwrap_err();
    assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("--compare-shared-rows"), "{err}");

    let mut shared = options(Criterion::Exact, Some(0));
    shared.plan.shared_rows = true;
    let r = diff(&ca, &cb, &shared, &Progress::default()).unwrap();
    assert_eq!(r.resized, vec![("embed".to_string(), 10, 13)]);
    let e = &r.tensors[0];
    assert_eq!(
        (e.name.as_str(), e.numel, e.shape.clone()),
        ("embed", 10, vec![10])
    );
    assert_eq!(e.changed, vec![1]);
    let bits = e.bits.as_ref().unwrap();
    assert_eq!(bits::count(bits, 10).unwrap(), 1);
    assert_eq!(bits[0], 1 << 3);
    // Shrunk works the same way; the tensors that agree are untouched.
    let r = diff(&cb, &ca, &shared, &Progress::default()).unwrap();
    assert_eq!(r.resized, vec![("embed".to_string(), 13, 10)]);
    assert_eq!(r.tensors[1].numel, 10);
}
